"""The job client SDK for asyncio: `AsyncInferenceClient` (also in `edgeinfer.fleet.client`).

    async with AsyncInferenceClient("mqtt://gateway:1883") as client:
        result = await client.infer("digits", {"x": batch}, device="gw-1")
        results = await asyncio.gather(*(client.infer("digits", {"x": b}, pool="line-3")
                                         for b in batches))
        async for part in client.stream("llm", {"prompt": text}, device="gw-1"):
            ...

It runs over the sync client's machinery: one MQTT connection and one reply topic, paho's
network thread, and the worker thread that decodes responses and enforces timeouts. Results
reach the event loop through `loop.call_soon_threadsafe`; nothing here blocks the loop
(connecting and closing, which wait on the broker, run in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.queries import ModelMetadata, ModelReady, QueryAnswer, QueryKind, ServerReady
from edgeinfer.contract.topics import DEFAULT_PREFIX
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.mqtt import BrokerError
from edgeinfer.fleet.oip import InferResult
from edgeinfer.fleet.streams import AsyncResponseStream
from edgeinfer.fleet.sync_client import InferenceClient

__all__ = ["AsyncInferenceClient", "AsyncResponseStream"]


class AsyncInferenceClient:
    """Submit inference jobs from asyncio code; any number may be in flight at once.

    Connect with `async with AsyncInferenceClient(url) as client:` or
    `await client.connect()` (then `await client.close()`). Tensors travel binary
    (Triton's binary-data extension) unless `binary=False`. Errors are the sync client's:
    an `InferenceError` subclass per error code, `TimeoutError`, `BrokerError`.
    """

    def __init__(
        self,
        broker_url: str = DEFAULT_BROKER_URL,
        prefix: str = DEFAULT_PREFIX,
        client_id: str | None = None,
        *,
        connect_timeout: float = 5.0,
        security: TransportSecurity | None = None,
    ) -> None:
        self._args = (broker_url, prefix, client_id)
        self._connect_timeout = connect_timeout
        self._security = security
        self._client: InferenceClient | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self) -> AsyncInferenceClient:
        """Connect and subscribe to the reply topic (in a thread: it waits on the broker)."""
        if self._client is None:
            broker_url, prefix, client_id = self._args
            self._client = await asyncio.to_thread(
                InferenceClient, broker_url, prefix, client_id,
                connect_timeout=self._connect_timeout, security=self._security,
            )
        return self

    async def close(self) -> None:
        """Disconnect; jobs still unanswered fail with `BrokerError`."""
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    async def __aenter__(self) -> AsyncInferenceClient:
        return await self.connect()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def sync(self) -> InferenceClient:
        """The underlying sync client (its connection, reply topic and worker)."""
        if self._client is None:
            raise BrokerError("the client is not connected: use `async with` or `await connect()`")
        return self._client

    @property
    def client_id(self) -> str:
        return self.sync.client_id

    @property
    def reply_topic(self) -> str:
        return self.sync.reply_topic

    @property
    def in_flight(self) -> int:
        return self._client.in_flight if self._client is not None else 0

    # -- jobs ------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        *,
        device: str | None = None,
        pool: str | None = None,
        version: str | None = None,
        outputs: Iterable[str] | None = None,
        job_id: str | None = None,
        timeout: float = 10.0,
        priority: int | None = None,
        expiry_s: float | None = None,
        parameters: Mapping[str, Any] | None = None,
        binary: bool = True,
    ) -> InferResult:
        """One job to `device` or `pool`; returns its `InferResult` or raises its error.

        Arguments as `InferenceClient.submit`. Cancelling the awaiting task stops waiting;
        the job itself has been sent and may still run.
        """
        loop = asyncio.get_running_loop()
        # Publishing only queues the packet for paho's network thread: it does not block.
        fut = self.sync.submit(
            model, inputs, device=device, pool=pool, version=version, outputs=outputs,
            job_id=job_id, timeout=timeout, priority=priority, expiry_s=expiry_s,
            parameters=parameters, binary=binary,
        )
        waiter: asyncio.Future[InferResult] = loop.create_future()
        fut.add_done_callback(lambda f: _call_in_loop(loop, _settle, waiter, f))
        return await waiter

    async def metadata(self, model: str, *, device: str | None = None,
                       pool: str | None = None, version: str | None = None,
                       timeout: float = 10.0) -> ModelMetadata:
        """KServe's model metadata of `model` on `device` or `pool`: as
        `InferenceClient.metadata`."""
        answer = await self._query(QueryKind.MODEL_METADATA, device, pool, model, version,
                                   timeout)
        assert isinstance(answer, ModelMetadata)
        return answer

    async def ready(self, model: str | None = None, *, device: str | None = None,
                    pool: str | None = None, version: str | None = None,
                    timeout: float = 10.0) -> bool:
        """Model ready (with `model`) or server ready (without): as
        `InferenceClient.ready`."""
        kind = QueryKind.SERVER_READY if model is None else QueryKind.MODEL_READY
        answer = await self._query(kind, device, pool, model, version, timeout)
        assert isinstance(answer, (ServerReady, ModelReady))
        return answer.ready

    async def _query(self, kind: QueryKind, device: str | None, pool: str | None,
                     model: str | None, version: str | None, timeout: float) -> QueryAnswer:
        loop = asyncio.get_running_loop()
        fut = self.sync.query(kind, device=device, pool=pool, model=model, version=version,
                              timeout=timeout)
        waiter: asyncio.Future[QueryAnswer] = loop.create_future()
        fut.add_done_callback(lambda f: _call_in_loop(loop, _settle, waiter, f))
        return await waiter

    def stream(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        *,
        device: str | None = None,
        pool: str | None = None,
        version: str | None = None,
        outputs: Iterable[str] | None = None,
        job_id: str | None = None,
        timeout: float = 10.0,
        priority: int | None = None,
        expiry_s: float | None = None,
        parameters: Mapping[str, Any] | None = None,
        binary: bool = True,
    ) -> AsyncResponseStream:
        """Send a job whose answer is streamed: `async for result in client.stream(...)`.

        Each response (`sequence_end: false` until the last, which says true) is an
        `InferResult`; `timeout` bounds the wait for each next response. Call it from a
        coroutine (it needs the running loop); the job is sent at once.
        """
        loop = asyncio.get_running_loop()
        job_id = job_id or f"j-{uuid.uuid4().hex[:16]}"
        s = AsyncResponseStream(job_id, uuid.uuid4().bytes, timeout, loop)
        self.sync.start_stream(
            s, model, inputs, device=device, pool=pool, version=version, outputs=outputs,
            timeout=timeout, priority=priority, expiry_s=expiry_s, parameters=parameters,
            binary=binary,
        )
        return s


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    # Runs on the client's worker thread (or here, if the job failed at once).
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


def _settle(waiter: asyncio.Future[Any], fut: Future[Any]) -> None:
    if waiter.done():  # the awaiting task was cancelled
        return
    exc = fut.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(fut.result())
