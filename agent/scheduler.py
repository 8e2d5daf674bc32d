"""Jobs: a bounded queue fed by the network thread, drained by worker threads.

Every job gets exactly one final answer: outputs, or an error with a DESIGN
code. Where the answer goes is decided first, so even a job that cannot be
parsed is answered (on `.../results` when it named no usable Response Topic).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.errors import Code, JobError
from agent.metrics import Metrics
from agent.mqtt_session import Inbound
from agent.protocol import (
    check_inputs,
    check_outputs,
    decode_request,
    encode_error,
    encode_response,
    peek_id,
)
from agent.registry import ModelRegistry
from agent.topics import has_wildcard

log = logging.getLogger(__name__)


# What the scheduler needs of the transport: topic, payload, correlation, user properties.
PublishFn = Callable[[str, bytes, bytes | None, Sequence[tuple[str, str]]], None]


@dataclass(frozen=True)
class Reply:
    topic: str
    correlation_data: bytes | None
    refusal: str | None  # why the requested Response Topic was not used


def route_reply(inbound: Inbound, results_topic: str, allowed: Sequence[str]) -> Reply:
    requested = inbound.response_topic
    if requested is None:
        return Reply(results_topic, inbound.correlation_data, None)
    if has_wildcard(requested) or not any(requested.startswith(p) for p in allowed):
        return Reply(
            results_topic,
            inbound.correlation_data,
            f"response topic {requested!r} refused: it must hold no wildcard and lie under "
            + " or ".join(repr(p) for p in allowed),
        )
    return Reply(requested, inbound.correlation_data, None)


class Scheduler:
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        publish: PublishFn,
        results_topic: str,
        reply_prefixes: Sequence[str],
        workers: int,
        queue_size: int,
        max_payload_bytes: int,
        max_tensor_elements: int,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._publish = publish
        self._results_topic = results_topic
        self._reply_prefixes = tuple(reply_prefixes)
        self._workers = workers
        self._max_payload = max_payload_bytes
        self._max_elements = max_tensor_elements
        self._queue: queue.Queue[Inbound | None] = queue.Queue(maxsize=queue_size)
        self._threads: list[threading.Thread] = []
        self._executed_lock = threading.Lock()
        self.executed = 0  # inference runs, for tests that count double execution

    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- intake (network thread) ---------------------------------------------------------

    def submit(self, inbound: Inbound) -> None:
        try:
            self._queue.put_nowait(inbound)
        except queue.Full:
            self._answer_error(
                inbound,
                peek_id(inbound.payload),
                None,
                JobError(
                    Code.RESOURCE_EXHAUSTED,
                    f"job queue is full ({self._queue.maxsize} waiting); retry later",
                ),
            )

    # --- workers -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            inbound = self._queue.get()
            if inbound is None:
                return
            try:
                self._handle(inbound)
            except Exception:
                # _handle answers every error itself; this is the last line of defence.
                log.exception("job handling failed")

    def _handle(self, inbound: Inbound) -> None:
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        job_id: str | None = None
        model_label: str | None = None
        try:
            if reply.refusal is not None:
                raise JobError(Code.INVALID_ARGUMENT, reply.refusal)
            if len(inbound.payload) > self._max_payload:
                job_id = peek_id(inbound.payload[: 64 * 1024])
                raise JobError(
                    Code.INVALID_ARGUMENT,
                    f"payload of {len(inbound.payload)} bytes is over the limit of "
                    f"{self._max_payload}",
                )
            req = decode_request(inbound.payload, inbound.user_properties)
            job_id = req.id
            deadline = _deadline(inbound, req.timeout_ms)
            _check_deadline(deadline)
            with self._registry.use(req.model_name, req.model_version) as model:
                model_label = model.label
                session = model.session
                arrays = check_inputs(req, session.inputs, model_label, self._max_elements)
                wanted = check_outputs(req, session.outputs, model_label)
                _check_deadline(deadline)
                started = time.monotonic()
                try:
                    outputs = session.infer(arrays, wanted)
                except Exception as exc:
                    raise JobError(
                        Code.INTERNAL, f"{session.runtime} failed on {model_label}: {exc}"
                    ) from exc
                finally:
                    with self._executed_lock:
                        self.executed += 1
                done = time.monotonic()
                queue_ms = (started - inbound.received) * 1000.0
                infer_ms = (done - started) * 1000.0
                encoded = encode_response(
                    req,
                    model.spec.name,
                    model.spec.version,
                    outputs,
                    {
                        "runtime": session.runtime,
                        "device": session.device,
                        "queue_ms": round(queue_ms, 3),
                        "infer_ms": round(infer_ms, 3),
                    },
                )
            self._publish(reply.topic, encoded.payload, reply.correlation_data,
                          encoded.user_properties)
            self._metrics.record_ok(
                model_label, queue_ms, infer_ms, (time.monotonic() - inbound.received) * 1000.0
            )
        except JobError as err:
            if job_id is None and len(inbound.payload) <= self._max_payload:
                job_id = peek_id(inbound.payload)  # the request failed before its id was read
            self._answer_error(inbound, job_id, model_label, err, reply)

    def _answer_error(
        self,
        inbound: Inbound,
        job_id: str | None,
        model_label: str | None,
        err: JobError,
        reply: Reply | None = None,
    ) -> None:
        if reply is None:
            reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        self._metrics.record_error(model_label, err.code.value)
        log.debug("job %s: %s %s", job_id, err.code.value, err.message)
        self._publish(
            reply.topic, encode_error(job_id, err.code, err.message), reply.correlation_data, ()
        )


def _deadline(inbound: Inbound, timeout_ms: float | None) -> float | None:
    limits = []
    if inbound.expiry_s is not None:
        limits.append(inbound.received + inbound.expiry_s)
    if timeout_ms is not None:
        limits.append(inbound.received + timeout_ms / 1000.0)
    return min(limits) if limits else None


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise JobError(Code.DEADLINE_EXCEEDED, "the job's deadline passed before it could run")
