"""The jobs a client waits for, and the worker thread that settles them.

`PendingJobs` keeps each job sent and not yet answered under its Correlation Data, with a
deadline. paho's network thread only hands responses (and refused publishes) to a bounded
queue; the worker thread decodes them, resolves the jobs' futures, feeds streamed jobs
their parts and fails the jobs past their deadline, so a slow `add_done_callback` never
stalls the MQTT connection (it delays other results). `InferenceClient`
(fleet/sync_client.py) sends the jobs; `AsyncInferenceClient` (fleet/aio.py) rides on it.
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
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from edgeinfer.contract.errors import Code
from edgeinfer.fleet.errors import InferenceError, Internal
from edgeinfer.fleet.mqtt import BrokerError
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY, InferResult, result_from_response, split_response
from edgeinfer.fleet.streams import is_final, is_held

__all__ = ["PendingJob", "PendingJobs"]

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
class PendingJob:
    job_id: str
    topic: str
    timeout: float
    future: Future[Any]
    raw: bool  # publish_raw: resolve with the response dict, never raise on error bodies
    deadline: float = math.inf
    # A streamed job: gets each response before the final one, which settles `future`.
    on_part: Callable[[InferResult], None] | None = None


class PendingJobs:
    """Jobs awaiting their answer, by Correlation Data; `start()` the worker, `close()` ends it.

    `add` and `discard` run on the sender's thread, `received` and `on_puback` on paho's
    network thread (they only queue), everything else on the worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[bytes, PendingJob] = {}
        self._deadlines: list[tuple[float, int, bytes]] = []
        self._seq = itertools.count()
        self._inbox: queue.Queue[object] = queue.Queue(_QUEUE_MAX)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="inference-client", daemon=True)

    def start(self) -> None:
        self._worker.start()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._pending)

    def add(self, correlation: bytes, job: PendingJob) -> None:
        """Wait for `job`'s answer; BrokerError when closed. Call it before publishing:
        the answer can beat publish()'s return."""
        with self._lock:
            if self._closed:
                raise BrokerError("the client is closed")
            self._pending[correlation] = job
            earliest = self._deadlines[0][0] if self._deadlines else math.inf
            heapq.heappush(self._deadlines, (job.deadline, next(self._seq), correlation))
        if job.deadline < earliest:
            self._wake()

    def discard(self, correlation: bytes) -> None:
        """Stop waiting for a job: its responses still to come are ignored."""
        with self._lock:
            self._pending.pop(correlation, None)

    def close(self, disconnect: Callable[[], None]) -> None:
        """Take no more jobs, `disconnect` (no answer arrives after it), stop the worker
        and fail every job still waiting with BrokerError. Only the first call acts."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        disconnect()
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join(5.0)
        for p in pending:
            _fail(p.future, BrokerError(f"client closed before job {p.job_id} was answered"))

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(_WAKE)

    # -- network thread: queue, never decode or block ------------------------------

    def received(self, msg: paho.MQTTMessage) -> None:
        """A message on the reply topic."""
        try:
            self._inbox.put_nowait(msg)
        except queue.Full:
            log.warning("response queue full: dropped a response on %s", msg.topic)

    def on_puback(self, acked: Future[None], correlation: bytes) -> None:
        """A job's publish settled: the worker fails the job if the broker refused it."""
        exc = acked.exception()
        if exc is not None:
            try:
                self._inbox.put_nowait(_Refused(correlation, str(exc)))
            except queue.Full:
                log.warning("response queue full: a refused job will time out instead")

    # -- the worker ----------------------------------------------------------------

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

    def _renew(self, correlation: bytes, p: PendingJob) -> None:
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
        expired: list[PendingJob] = []
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
