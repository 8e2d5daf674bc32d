"""The job client SDK: OIP v2 inference jobs over MQTT v5 request/response.

One connection, one reply topic (`{prefix}/reply/{client_id}/res`) subscribed once;
each job carries a unique Correlation Data that its response echoes, so any number
of jobs can be in flight at once.

    with InferenceClient("mqtt://gateway:1883") as client:
        result = client.infer("digits", {"x": batch}, device="gw-1")
        print(result.outputs["label"], result.parameters["runtime"])
        for part in client.stream("llm", {"prompt": text}, device="gw-1"):
            ...  # each response of a streamed job, the last one says sequence_end: true

`AsyncInferenceClient` (fleet/aio.py, importable from here) is the asyncio flavour.

Threads: paho's network thread only hands responses to a queue. A worker thread
decodes them, resolves the futures and fails those past their timeout, so a slow
`add_done_callback` never stalls the MQTT connection (it delays other results).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as paho

from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.errors import Code
from edgeinfer.contract.properties import PackedPublishProperties
from edgeinfer.contract.topics import DEFAULT_PREFIX, DEVICE_ID_RE, POOL_RE, Topics, reply_prefix
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.errors import (
    DeadlineExceeded,
    InferenceError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from edgeinfer.fleet.mqtt import BrokerError, Connection, connect, new_client_id
from edgeinfer.fleet.oip import (
    HEADER_LENGTH_PROPERTY,
    InferResult,
    encode_request,
    result_from_response,
    split_response,
)
from edgeinfer.fleet.streams import ResponseStream, StreamBase, is_final, is_held

if TYPE_CHECKING:
    from edgeinfer.fleet.aio import AsyncInferenceClient

__all__ = [
    "AsyncInferenceClient",
    "DeadlineExceeded",
    "InferResult",
    "InferenceClient",
    "InferenceError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "ResponseStream",
    "Unavailable",
]

log = logging.getLogger(__name__)

# Responses waiting for the worker. Bounded so a flood on the reply topic costs
# dropped messages (those jobs time out), not unbounded memory.
_QUEUE_MAX = 100_000
_STOP = object()
_WAKE = object()


@dataclass(frozen=True)
class _Refused:
    """The broker refused a job's publish (e.g. not authorized)."""

    correlation: bytes
    reason: str


@dataclass
class _Pending:
    job_id: str
    topic: str
    timeout: float
    future: Future[Any]
    raw: bool  # publish_raw: resolve with the response dict, never raise on error bodies
    deadline: float = math.inf
    # A streamed job: gets each response before the final one, which settles `future`.
    on_part: Callable[[InferResult], None] | None = None


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
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Pending] = {}
        self._deadlines: list[tuple[float, int, bytes]] = []
        self._seq = itertools.count()
        self._inbox: queue.Queue[object] = queue.Queue(_QUEUE_MAX)
        self._closed = False
        self._conn: Connection = connect(broker_url, client_id=client_id, timeout_s=connect_timeout,
                                         security=security)
        self._worker = threading.Thread(target=self._run, name="inference-client", daemon=True)
        self._worker.start()
        try:
            self._conn.subscribe(self.reply_topic, self._on_response, qos=1)
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
        self._start_stream(
            s, model, inputs, device=device, pool=pool, version=version, outputs=outputs,
            timeout=timeout, priority=priority, expiry_s=expiry_s, parameters=parameters,
            binary=binary,
        )
        return s

    def _start_stream(self, s: StreamBase, model: str, inputs: Mapping[str, Any], **kw: Any) -> None:
        """Send a streamed job for `s` (a fleet.streams stream): parts, then its end."""
        s._bind(lambda: self._cancel(s.correlation))
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        self._conn.close()
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join(5.0)
        for p in pending:
            _fail(p.future, BrokerError(f"client closed before job {p.job_id} was answered"))

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

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
        with self._lock:
            if self._closed:
                raise BrokerError("the client is closed")
            # Registered before publishing: the answer can beat publish()'s return.
            self._pending[correlation] = _Pending(job_id, topic, timeout, fut, raw, deadline,
                                                  on_part)
            earliest = self._deadlines[0][0] if self._deadlines else math.inf
            heapq.heappush(self._deadlines, (deadline, next(self._seq), correlation))
        if deadline < earliest:
            self._wake()
        try:
            acked = self._conn.publish(topic, payload, qos=1, properties=props)
        except Exception:  # e.g. paho refusing a topic or an oversized payload
            with self._lock:
                self._pending.pop(correlation, None)
            raise
        acked.add_done_callback(lambda a: self._on_puback(a, correlation))
        return fut

    def _on_puback(self, acked: Future[None], correlation: bytes) -> None:
        # Runs on the network thread: the worker fails the job, not us.
        exc = acked.exception()
        if exc is not None:
            try:
                self._inbox.put_nowait(_Refused(correlation, str(exc)))
            except queue.Full:
                log.warning("response queue full: a refused job will time out instead")

    def _cancel(self, correlation: bytes) -> None:
        """Stop waiting for a job: its responses still to come are ignored."""
        with self._lock:
            self._pending.pop(correlation, None)

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(_WAKE)

    # -- receiving -----------------------------------------------------------------

    def _on_response(self, msg: paho.MQTTMessage) -> None:
        # Network thread: no decoding, no future callbacks, never block.
        try:
            self._inbox.put_nowait(msg)
        except queue.Full:
            log.warning("response queue full: dropped a response on %s", msg.topic)

    def _run(self) -> None:
        while True:
            with self._lock:
                wait = self._deadlines[0][0] - time.monotonic() if self._deadlines else None
            try:
                item = self._inbox.get(timeout=None if wait is None else max(wait, 0.0))
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            try:
                if isinstance(item, paho.MQTTMessage):
                    self._deliver(item)
                elif isinstance(item, _Refused):
                    self._refuse(item)
            except Exception:
                log.exception("could not settle a job")
            self._expire()

    def _deliver(self, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        correlation = getattr(props, "CorrelationData", None)
        corr = bytes(correlation) if correlation else b""
        with self._lock:
            p = self._pending.pop(corr, None) if corr else None
        if p is None:
            # Late (after its timeout), or not ours: nothing waits for it.
            log.debug("ignored a response on %s with unknown correlation data", msg.topic)
            return
        header_length = None
        for key, value in getattr(props, "UserProperty", None) or []:
            if key.lower() == HEADER_LENGTH_PROPERTY.lower():
                header_length = int(value) if value.isdigit() else -1
        try:
            doc, tail = split_response(bytes(msg.payload), header_length)
        except ValueError as exc:
            _fail(p.future, Internal(
                Code.INTERNAL, f"malformed response to job {p.job_id}: {exc}", job_id=p.job_id,
            ))
            return
        if is_held(doc):
            # Not the job's answer: the agent holds the job until its disk has room. Wait
            # on, under the job's own deadline (its entry in _deadlines still stands).
            log.warning("job %s: %s (held by the agent; its answer follows)", p.job_id,
                        doc.get("error"))
            with self._lock:
                closed = self._closed
                if not closed:
                    self._pending[corr] = p
            if closed:
                _fail(p.future, BrokerError(f"client closed before job {p.job_id} was answered"))
            return
        if p.raw:
            p.future.set_result(doc)
            return
        try:
            result = result_from_response(doc, tail)
        except InferenceError as exc:
            _fail(p.future, exc)
            return
        if p.on_part is not None and not is_final(doc):
            self._renew(corr, p)
            p.on_part(result)
            return
        p.future.set_result(result)

    def _renew(self, correlation: bytes, p: _Pending) -> None:
        # A streamed job answered in part: wait up to its timeout again for the next part.
        p.deadline = time.monotonic() + p.timeout
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._pending[correlation] = p
                heapq.heappush(self._deadlines, (p.deadline, next(self._seq), correlation))
        if closed:
            _fail(p.future, BrokerError(f"client closed before job {p.job_id} was answered"))

    def _refuse(self, refused: _Refused) -> None:
        with self._lock:
            p = self._pending.pop(refused.correlation, None)
        if p is not None:
            _fail(p.future, BrokerError(
                f"job {p.job_id} to {p.topic} not accepted: {refused.reason}"
            ))

    def _expire(self) -> None:
        now = time.monotonic()
        expired: list[_Pending] = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, correlation = heapq.heappop(self._deadlines)
                p = self._pending.get(correlation)
                # A streamed job's deadline moves on with each part: older entries are stale.
                if p is not None and p.deadline <= now:
                    del self._pending[correlation]
                    expired.append(p)
        for p in expired:
            _fail(p.future, TimeoutError(
                f"job {p.job_id} to {p.topic}: no response within {p.timeout:g}s"
            ))


def _fail(fut: Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def __getattr__(name: str) -> Any:
    # fleet.aio imports this module, so it is imported here only when asked for.
    if name == "AsyncInferenceClient":
        from edgeinfer.fleet.aio import AsyncInferenceClient  # noqa: PLC0415

        return AsyncInferenceClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
