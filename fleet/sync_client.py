"""`InferenceClient`, the job client SDK's thread-based flavour (import it from
`edgeinfer.fleet.client`): OIP v2 inference jobs over MQTT v5 request/response.

One connection, one reply topic (`{prefix}/reply/{client_id}/res`) subscribed once;
each job carries a unique Correlation Data that its response echoes, so any number
of jobs can be in flight at once. This module builds and publishes the jobs;
`PendingJobs` (fleet/pending.py) waits for their answers on a worker thread.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.properties import PackedPublishProperties
from edgeinfer.contract.queries import (
    ModelMetadata,
    ModelReady,
    QueryAnswer,
    QueryKind,
    ServerReady,
    encode_query,
)
from edgeinfer.contract.topics import DEFAULT_PREFIX, DEVICE_ID_RE, POOL_RE, Topics, reply_prefix
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.mqtt import BrokerError, Connection, connect, new_client_id
from edgeinfer.fleet.oip import (
    HEADER_LENGTH_PROPERTY,
    InferResult,
    answer_from_response,
    encode_request,
)
from edgeinfer.fleet.pending import PendingJob, PendingJobs
from edgeinfer.fleet.streams import ResponseStream, StreamBase

__all__ = ["InferenceClient"]


class InferenceClient:
    """Submit inference jobs to a device or a pool and get typed results back."""

    def __init__(
        self,
        broker_url: str = DEFAULT_BROKER_URL,
        prefix: str = DEFAULT_PREFIX,
        client_id: str | None = None,
        *,
        connect_timeout: float = 5.0,
        security: TransportSecurity | None = None,
    ) -> None:
        client_id = client_id or new_client_id("client")
        # The client id is a topic level of the reply topic: no '/', '+' or '#'.
        if not DEVICE_ID_RE.match(client_id):
            raise ValueError(f"client id {client_id!r} must match {DEVICE_ID_RE.pattern}")
        self.prefix = prefix.rstrip("/")
        self.client_id = client_id
        self.reply_topic = f"{reply_prefix(self.prefix)}{client_id}/res"
        self._jobs = PendingJobs()
        self._conn: Connection = connect(broker_url, client_id=client_id, timeout_s=connect_timeout,
                                         security=security)
        self._jobs.start()
        try:
            self._conn.subscribe(self.reply_topic, self._jobs.received, qos=1)
        except BrokerError:
            self.close()
            raise

    # -- public API ----------------------------------------------------------------

    def submit(
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
        binary: bool = False,
    ) -> Future[InferResult]:
        """Publish one job to `device` or `pool`; the future holds the result.

        The future fails with an `InferenceError` subclass for an error response,
        `TimeoutError` if no response came within `timeout` seconds, or `BrokerError`
        if the broker refused the job. `expiry_s` becomes the MQTT Message Expiry
        Interval (the job must not wait longer); `parameters` are extra OIP request
        parameters (e.g. `timeout_ms`); `binary` sends tensors as raw bytes
        (Triton's binary-data extension) and asks for binary outputs.
        """
        return self._submit(
            model, inputs, device=device, pool=pool, version=version, outputs=outputs,
            job_id=job_id, timeout=timeout, priority=priority, expiry_s=expiry_s,
            parameters=parameters, binary=binary,
        )

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
        binary: bool = False,
    ) -> ResponseStream:
        """Publish one job whose answer is streamed; iterate the result for its responses.

        As `submit`, but every response (`sequence_end: false` until the last) is yielded
        as an `InferResult`; `timeout` bounds the wait for each next response.
        """
        job_id = job_id or f"j-{uuid.uuid4().hex[:16]}"
        s = ResponseStream(job_id, uuid.uuid4().bytes, timeout)
        self.start_stream(
            s, model, inputs, device=device, pool=pool, version=version, outputs=outputs,
            timeout=timeout, priority=priority, expiry_s=expiry_s, parameters=parameters,
            binary=binary,
        )
        return s

    def start_stream(self, s: StreamBase, model: str, inputs: Mapping[str, Any], **kw: Any) -> None:
        """Send a streamed job for `s` (a fleet.streams stream: `ResponseStream`, or fleet.aio's
        `AsyncResponseStream`), which gets its parts, then its end; `kw` as `stream`."""
        s._bind(lambda: self._jobs.discard(s.correlation))
        fut = self._submit(model, inputs, job_id=s.job_id, correlation=s.correlation,
                           on_part=s._part, **kw)
        fut.add_done_callback(s._done)

    def _submit(
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
        binary: bool = False,
        correlation: bytes | None = None,
        on_part: Callable[[InferResult], None] | None = None,
    ) -> Future[InferResult]:
        topic = self._jobs_topic(device, pool)
        job_id = job_id or f"j-{uuid.uuid4().hex[:16]}"
        params = dict(parameters or {})
        if priority is not None:
            params["priority"] = priority
        if "timeout_ms" in params:
            # The agent counts timeout_ms from here, so time spent waiting in the broker
            # for an absent agent counts too.
            params.setdefault("sent_at_ms", int(time.time() * 1000))
        body, header_length = encode_request(
            job_id, model, inputs, version=version, outputs=outputs, parameters=params,
            binary=binary,
        )
        user_props = []
        if header_length is not None:
            user_props.append((HEADER_LENGTH_PROPERTY, str(header_length)))
        return self._send(
            topic, body, job_id=job_id, timeout=timeout, expiry_s=expiry_s,
            user_properties=user_props, raw=False, correlation=correlation, on_part=on_part,
        )

    def infer(
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
        binary: bool = False,
    ) -> InferResult:
        """`submit(...)` and wait for the result; raises what the future would hold."""
        fut = self.submit(
            model, inputs, device=device, pool=pool, version=version, outputs=outputs,
            job_id=job_id, timeout=timeout, priority=priority, expiry_s=expiry_s,
            parameters=parameters, binary=binary,
        )
        # The worker fails the future at `timeout` with a TimeoutError naming the job;
        # the margin only guards against a stuck worker.
        return fut.result(timeout + 5.0)

    # -- health and metadata (OIP's, edgeinfer.contract.queries) ---------------------

    def metadata(self, model: str, *, device: str | None = None, pool: str | None = None,
                 version: str | None = None, timeout: float = 10.0) -> ModelMetadata:
        """What `model` (`version`; default: the one a job naming none gets) takes and
        returns on `device` (or a device of `pool`): KServe's model metadata, with its
        inputs' and outputs' names, datatypes and shapes (-1: any size). Raises NotFound
        when it is not served there, TimeoutError when no answer came within `timeout`."""
        answer = self.query(QueryKind.MODEL_METADATA, device=device, pool=pool, model=model,
                            version=version, timeout=timeout).result(timeout + 5.0)
        assert isinstance(answer, ModelMetadata)
        return answer

    def ready(self, model: str | None = None, *, device: str | None = None,
              pool: str | None = None, version: str | None = None,
              timeout: float = 10.0) -> bool:
        """Whether `model` (`version`) would run a job now on `device` (or a device of
        `pool`): False while it loads or after it failed, NotFound when the device was
        never told to serve it. Without `model`: whether the device serves every model it
        was told to and takes jobs (KServe's server ready)."""
        kind = QueryKind.SERVER_READY if model is None else QueryKind.MODEL_READY
        answer = self.query(kind, device=device, pool=pool, model=model, version=version,
                            timeout=timeout).result(timeout + 5.0)
        assert isinstance(answer, (ServerReady, ModelReady))
        return answer.ready

    def query(self, kind: QueryKind, *, device: str | None = None, pool: str | None = None,
              model: str | None = None, version: str | None = None,
              timeout: float = 10.0) -> Future[QueryAnswer]:
        """Send one OIP health or metadata query; the future holds its typed answer, or the
        InferenceError, TimeoutError or BrokerError that `submit`'s would. The query
        expires in the broker after `timeout` (nobody waits for a later answer)."""
        topic = self._jobs_topic(device, pool)
        query_id = f"q-{uuid.uuid4().hex[:16]}"
        body, user_props = encode_query(kind, query_id=query_id, model=model, version=version)
        raw: Future[dict[str, Any]] = self._send(
            topic, body, job_id=query_id, timeout=timeout, expiry_s=timeout,
            user_properties=user_props, raw=True,
        )
        typed: Future[QueryAnswer] = Future()

        def settle(done: Future[dict[str, Any]]) -> None:
            # On the client's worker thread: the answer is small, its reading cheap.
            try:
                typed.set_result(answer_from_response(kind, done.result()))
            except Exception as exc:  # the InferenceError, or the raw future's own
                typed.set_exception(exc)

        raw.add_done_callback(settle)
        return typed

    def publish_raw(
        self,
        topic: str,
        payload: bytes,
        *,
        job_id: str = "raw",
        timeout: float = 10.0,
        expiry_s: float | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
        response_topic: str | None = None,
    ) -> Future[dict[str, Any]]:
        """Publish any payload as a job and get the response's JSON header as a dict.

        For tests of malformed jobs: nothing is validated, error bodies do not raise.
        `job_id` only names the job in a timeout message. `response_topic` overrides
        the reply topic (a response to another topic will not reach this client).
        """
        return self._send(
            topic, payload, job_id=job_id, timeout=timeout, expiry_s=expiry_s,
            user_properties=list(user_properties), raw=True, response_topic=response_topic,
        )

    def close(self) -> None:
        """Disconnect; jobs still unanswered fail with `BrokerError`."""
        self._jobs.close(self._conn.close)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return self._jobs.count

    # -- sending -------------------------------------------------------------------

    def _jobs_topic(self, device: str | None, pool: str | None) -> str:
        if (device is None) == (pool is None):
            raise ValueError("name exactly one of device= or pool=")
        if device is not None:
            if not DEVICE_ID_RE.match(device):
                raise ValueError(f"device id {device!r} must match {DEVICE_ID_RE.pattern}")
            return Topics(self.prefix, device).jobs
        assert pool is not None
        if not POOL_RE.match(pool):
            raise ValueError(f"pool {pool!r} must match {POOL_RE.pattern}")
        return Topics(self.prefix, "").pool_jobs(pool)

    def _send(
        self,
        topic: str,
        payload: bytes,
        *,
        job_id: str,
        timeout: float,
        expiry_s: float | None,
        user_properties: list[tuple[str, str]],
        raw: bool,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        on_part: Callable[[InferResult], None] | None = None,
    ) -> Future[Any]:
        correlation = correlation or uuid.uuid4().bytes
        # Whole seconds on the wire; round up so a job never expires early.
        props = PackedPublishProperties(
            correlation, user_properties, response_topic=response_topic or self.reply_topic,
            expiry_s=None if expiry_s is None else max(1, math.ceil(expiry_s)))
        fut: Future[Any] = Future()
        deadline = time.monotonic() + timeout
        # Registered before publishing: the answer can beat publish()'s return.
        self._jobs.add(correlation, PendingJob(job_id, topic, timeout, fut, raw, deadline, on_part))
        try:
            acked = self._conn.publish(topic, payload, qos=1, properties=props)
        except Exception:  # e.g. paho refusing a topic or an oversized payload
            self._jobs.discard(correlation)
            raise
        acked.add_done_callback(lambda a: self._jobs.on_puback(a, correlation))
        return fut
