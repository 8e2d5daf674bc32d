"""Jobs: intake from the network thread, a durable journal, worker threads, one answer each.

The network thread only puts a job on the bounded intake queue. The intake thread writes
jobs to the journal in batches and only then acknowledges them to the broker; a job seen
before is answered from its stored answer. Workers run jobs and write each answer to the
journal together with its outbox row, which the outbox publisher sends. Where an answer
goes is decided first, so even a job that cannot be parsed is answered (on `.../results`
when it named no usable Response Topic).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.config import JobsConfig
from agent.errors import Code, JobError
from agent.journal import Journal, StoredJob
from agent.metrics import Metrics
from agent.mqtt_session import Inbound
from agent.outbox import OutboxPublisher
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

# Direct publish for answers that cannot wait for the journal: topic, payload, correlation.
SendNow = Callable[[str, bytes, bytes | None], None]
Ack = Callable[[int, int], None]

INTAKE_BATCH = 256
PRUNE_EVERY_S = 10.0


@dataclass(frozen=True)
class Reply:
    topic: str
    correlation_data: bytes | None
    refusal: str | None  # why the requested Response Topic was not used


@dataclass(frozen=True)
class Answer:
    reply: Reply
    payload: bytes
    user_properties: tuple[tuple[str, str], ...]
    executed: bool


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


def job_key(inbound: Inbound, results_topic: str) -> str:
    """Identity for de-duplication: the job id within its reply topic.

    Two clients may both call a job "j-1"; their reply topics tell them apart. A job
    without an id is known by its correlation data, or not de-duplicated at all.
    """
    where = inbound.response_topic or results_topic
    job_id = peek_id(inbound.payload[: 64 * 1024]) if inbound.payload[:1] == b"{" else None
    if job_id is not None:
        return f"id:{where}|{job_id}"
    if inbound.correlation_data:
        digest = hashlib.sha256(where.encode() + b"\0" + inbound.correlation_data).hexdigest()
        return f"corr:{digest}"
    return f"anon:{uuid.uuid4().hex}"


def stored(inbound: Inbound, key: str) -> StoredJob:
    return StoredJob(
        key=key,
        topic=inbound.topic,
        payload=inbound.payload,
        response_topic=inbound.response_topic,
        correlation=inbound.correlation_data,
        user_props=inbound.user_properties,
        expiry_s=inbound.expiry_s,
        received_wall=inbound.received_wall,
    )


def revived(job: StoredJob) -> Inbound:
    """A journaled job as the workers see it, its age carried over from before the restart."""
    age = max(0.0, time.time() - job.received_wall)
    return Inbound(
        topic=job.topic,
        payload=job.payload,
        qos=1,
        retain=False,
        response_topic=job.response_topic,
        correlation_data=job.correlation,
        user_properties=job.user_props,
        expiry_s=job.expiry_s,
        received=time.monotonic() - age,
        received_wall=job.received_wall,
    )


class Scheduler:
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        journal: Journal,
        outbox: OutboxPublisher,
        ack: Ack,
        send_now: SendNow,
        results_topic: str,
        reply_prefixes: Sequence[str],
        cfg: JobsConfig,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._journal = journal
        self._outbox = outbox
        self._ack = ack
        self._send_now = send_now
        self._results_topic = results_topic
        self._reply_prefixes = tuple(reply_prefixes)
        self._cfg = cfg
        self._intake: queue.Queue[Inbound | None] = queue.Queue(maxsize=max(cfg.queue_size, 1024))
        self._work_q: queue.Queue[tuple[str, Inbound] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._queued = 0  # journaled, not yet answered
        self._queued_bytes = 0  # their payloads
        # A repeat of a job still running, from another correlation (a client's retry as a
        # new request): answered from the stored answer once the job is done.
        self._first_correlation: dict[str, bytes | None] = {}
        self._repeats: dict[str, list[bytes | None]] = {}
        self._stopping = threading.Event()
        # Set by drain(): new jobs are then neither journaled nor acknowledged, so the broker
        # keeps them for this device's next session. Held while a batch is admitted.
        self._draining = threading.Event()
        self._admitting = threading.Lock()
        self._busy_since: dict[str, float] = {}  # worker -> when its running job started
        self.executed = 0  # inference runs in this process
        self.duplicates = 0  # jobs answered from a stored answer
        self.rejected = 0  # jobs refused with RESOURCE_EXHAUSTED

    def depth(self) -> int:
        with self._lock:
            return self._queued

    # --- health and drain (agent/lifecycle.py) -------------------------------------------

    def longest_job(self) -> tuple[str, float] | None:
        """The worker whose running job started first, and for how many seconds it has run."""
        now = time.monotonic()
        with self._lock:
            if not self._busy_since:
                return None
            name, since = min(self._busy_since.items(), key=lambda kv: kv[1])
        return name, now - since

    def dead_threads(self) -> list[str]:
        return [t.name for t in self._threads if not t.is_alive()]

    def drain(self, timeout: float) -> int:
        """Take no more jobs; wait up to `timeout` s for the taken ones to be answered.

        Returns how many are still unanswered: they stay in the journal and run after the
        next start, as do jobs that arrive from now on (the broker keeps them unacknowledged).
        """
        self._draining.set()
        with self._admitting:  # a batch being admitted now is counted before we look
            pass
        deadline = time.monotonic() + timeout
        while self.depth() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.depth()

    # --- lifecycle -----------------------------------------------------------------------

    def recover(self) -> int:
        """Queue what the journal holds unanswered from before a restart."""
        pending = self._journal.pending()
        for job in pending:
            self._work_q.put((job.key, revived(job)))
        with self._lock:
            self._queued += len(pending)
            self._queued_bytes += sum(len(j.payload) for j in pending)
        if pending:
            log.info("recovered %d unanswered job(s) from the journal", len(pending))
        return len(pending)

    def start(self) -> None:
        intake = threading.Thread(target=self._intake_loop, name="job-intake", daemon=True)
        intake.start()
        self._threads.append(intake)
        for i in range(self._cfg.workers):
            t = threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._intake.put(None)
        for _ in range(self._cfg.workers):
            self._work_q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- intake: network thread, then the intake thread ----------------------------------

    def submit(self, inbound: Inbound) -> None:
        """Network thread: hand over, never block."""
        try:
            self._intake.put_nowait(inbound)
        except queue.Full:
            self._refuse_now(inbound, "the agent's intake is full")

    def _refuse_now(self, inbound: Inbound, why: str) -> None:
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        job_id = peek_id(inbound.payload[: 64 * 1024])
        self.rejected += 1
        self._metrics.record_error(None, Code.RESOURCE_EXHAUSTED.value)
        self._send_now(
            reply.topic,
            encode_error(job_id, Code.RESOURCE_EXHAUSTED, f"{why}; retry later"),
            reply.correlation_data,
        )
        self._ack(inbound.mid, inbound.qos)

    def _intake_loop(self) -> None:
        last_prune = 0.0
        while True:
            first = self._intake.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < INTAKE_BATCH:
                try:
                    more = self._intake.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._intake.put(None)
                    break
                batch.append(more)
            try:
                with self._admitting:
                    if self._draining.is_set():
                        log.info("stopping: %d job(s) left with the broker for the next start",
                                 len(batch))
                        continue
                    self._admit(batch)
            except Exception:
                # Not acknowledged: the broker delivers these again after a reconnect.
                log.exception("journal write failed for %d job(s)", len(batch))
            now = time.monotonic()
            if now - last_prune > PRUNE_EVERY_S:
                last_prune = now
                self._journal.prune(time.time() - self._cfg.dedup_window_s)

    def _admit(self, batch: list[Inbound]) -> None:
        with self._lock:
            room = self._cfg.queue_size - self._queued
            room_bytes = self._cfg.max_queued_bytes - self._queued_bytes
        accepted: list[tuple[str, Inbound]] = []
        for inbound in batch:
            if len(accepted) >= room or len(inbound.payload) > room_bytes:
                self._refuse_journaled(inbound)
                continue
            room_bytes -= len(inbound.payload)
            accepted.append((job_key(inbound, self._results_topic), inbound))
        decisions = self._journal.admit([stored(i, k) for k, i in accepted])
        new = new_bytes = 0
        for (key, inbound), decision in zip(accepted, decisions, strict=True):
            if decision.kind == "new":
                new += 1
                new_bytes += len(inbound.payload)
                with self._lock:
                    self._first_correlation[key] = inbound.correlation_data
                self._work_q.put((key, inbound))
            elif decision.kind == "duplicate_done":
                self.duplicates += 1
                if self._journal.resend_stored(key, inbound.correlation_data) is not None:
                    self._outbox.added(0)
            else:  # duplicate_pending: the answer is on the way to the first correlation
                self.duplicates += 1
                with self._lock:
                    if self._first_correlation.get(key, inbound.correlation_data) != (
                        inbound.correlation_data
                    ):
                        self._repeats.setdefault(key, []).append(inbound.correlation_data)
        with self._lock:
            self._queued += new
            self._queued_bytes += new_bytes
        for _, inbound in accepted:
            self._ack(inbound.mid, inbound.qos)
        self._outbox.wake()

    def _refuse_journaled(self, inbound: Inbound) -> None:
        """Queue full: the refusal goes through the outbox, and the job is not kept."""
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        payload = encode_error(
            peek_id(inbound.payload[: 64 * 1024]),
            Code.RESOURCE_EXHAUSTED,
            f"job queue is full ({self._cfg.queue_size} jobs or "
            f"{self._cfg.max_queued_bytes} bytes waiting); retry later",
        )
        self.rejected += 1
        self._metrics.record_error(None, Code.RESOURCE_EXHAUSTED.value)
        self._journal.enqueue(reply.topic, payload, 1, reply.correlation_data)
        self._outbox.added(len(payload))
        self._ack(inbound.mid, inbound.qos)

    # --- workers -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._work_q.get()
            if item is None:
                return
            key, inbound = item
            # Backpressure: answers wait on disk for the broker; do not pile up more.
            while not self._outbox.wait_room(0.5):
                if self._stopping.is_set():
                    break
            try:
                answer = self._answer_timed(inbound)
                self._journal.complete(
                    key, answer.executed, answer.reply.topic, answer.payload,
                    answer.reply.correlation_data, answer.user_properties,
                )
                self._outbox.added(len(answer.payload))
                with self._lock:
                    self._first_correlation.pop(key, None)
                    repeats = self._repeats.pop(key, [])
                for correlation in repeats:
                    if self._journal.resend_stored(key, correlation) is not None:
                        self._outbox.added(len(answer.payload))
            except Exception:
                # The job stays in the journal unanswered and runs again after a restart.
                log.exception("job %s: could not record its answer", key)
            finally:
                with self._lock:
                    self._queued -= 1
                    self._queued_bytes -= len(inbound.payload)

    def _answer_timed(self, inbound: Inbound) -> Answer:
        """`_answer`, with the start time on record for the watchdog's stall check."""
        name = threading.current_thread().name
        with self._lock:
            self._busy_since[name] = time.monotonic()
        try:
            return self._answer(inbound)
        finally:
            with self._lock:
                self._busy_since.pop(name, None)

    def _answer(self, inbound: Inbound) -> Answer:
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        job_id: str | None = None
        model_label: str | None = None
        executed = False
        try:
            if reply.refusal is not None:
                raise JobError(Code.INVALID_ARGUMENT, reply.refusal)
            if len(inbound.payload) > self._cfg.max_payload_bytes:
                raise JobError(
                    Code.INVALID_ARGUMENT,
                    f"payload of {len(inbound.payload)} bytes is over the limit of "
                    f"{self._cfg.max_payload_bytes}",
                )
            req = decode_request(inbound.payload, inbound.user_properties)
            job_id = req.id
            deadline = _deadline(inbound, req.timeout_ms, req.sent_at_ms)
            _check_deadline(deadline)
            with self._registry.use(req.model_name, req.model_version) as model:
                model_label = model.label
                session = model.session
                arrays = check_inputs(req, session.inputs, model_label,
                                      self._cfg.max_tensor_elements)
                wanted = check_outputs(req, session.outputs, model_label)
                _check_deadline(deadline)
                started = time.monotonic()
                executed = True
                with self._lock:
                    self.executed += 1
                try:
                    outputs = session.infer(arrays, wanted)
                except Exception as exc:
                    raise JobError(
                        Code.INTERNAL, f"{session.runtime} failed on {model_label}: {exc}"
                    ) from exc
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
            self._metrics.record_ok(
                model_label, queue_ms, infer_ms, (time.monotonic() - inbound.received) * 1000.0
            )
            return Answer(reply, encoded.payload, encoded.user_properties, executed)
        except Exception as exc:
            if isinstance(exc, JobError):
                err = exc
            else:
                # A bug of ours must still give the job its one answer.
                log.exception("job failed unexpectedly")
                err = JobError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            if job_id is None and len(inbound.payload) <= self._cfg.max_payload_bytes:
                job_id = peek_id(inbound.payload)  # the request failed before its id was read
            self._metrics.record_error(model_label, err.code.value)
            log.debug("job %s: %s %s", job_id, err.code.value, err.message)
            return Answer(reply, encode_error(job_id, err.code, err.message), (), executed)


def _deadline(inbound: Inbound, timeout_ms: float | None, sent_at_ms: float | None) -> float | None:
    """The job's deadline on the monotonic clock, or None.

    The expiry interval counts from when the agent got the job. `timeout_ms` counts from
    `parameters.sent_at_ms` (the client's wall clock, ms since the epoch) when the request
    has it, so time spent waiting in the broker for an absent agent counts too.
    """
    limits = []
    if inbound.expiry_s is not None:
        limits.append(inbound.received + inbound.expiry_s)
    if timeout_ms is not None:
        start = inbound.received
        if sent_at_ms is not None and inbound.received_wall:
            start -= max(0.0, inbound.received_wall - sent_at_ms / 1000.0)
        limits.append(start + timeout_ms / 1000.0)
    return min(limits) if limits else None


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise JobError(Code.DEADLINE_EXCEEDED, "the job's deadline passed before it could run")
