"""Jobs: intake from the network thread, a durable journal, worker threads, one answer each.

The network thread only puts a job on the intake queue. The intake thread reads the job's
OIP header (once: the typed `Job` carries it, its reply, priority and deadline to whoever
runs it), writes the jobs that arrived together to the journal in one transaction, and
only then acknowledges them to the broker; a job seen before is answered from its stored
answer. Workers run jobs; each answer is recorded (the job's `done` mark and the answer's
outbox row) in a group commit and then published by the thread that committed it. Where
an answer goes is decided first, so even a job that cannot be parsed is answered (on
`.../results` when it named no usable Response Topic).

The path of one job, from the network thread calling the jobs route's handler with its
`Inbound` to its answer's bytes leaving (session.publish), counted before and after
issue 11's "job path without detours" (steady state, tiny binary job, QoS 1):

    before                                       after
    network -> intake (queue.Queue)              network -> intake (queue.SimpleQueue)
    intake: peek_meta (parse 1), admit txn       intake: decode_request (the one parse),
      (one per batch of arrivals), PUBACKs,        admit txn (one per batch of arrivals,
      a needless wake of the outbox thread         with the answers waiting for a commit)
    intake -> worker (PriorityQueue)             intake -> worker (PriorityQueue), or none:
    worker: peek_meta (parse 2),                   the intake runs the job itself when its
      decode_request (parse 3), run,               run should take <= INLINE_MAX_S (by size),
      complete txn (one per job), publish          no job waits and no worker runs
                                                 worker: run; group commit of the answers
                                                   there are (a worker that finds a commit
                                                   under way leaves its answer to it and
                                                   goes on), publish from the committer
    then: each PUBACK woke the outbox thread     then: the first and the 32nd PUBACK of a
      (one DELETE per <= 32 within 2 ms)           group wake it (one DELETE as before)

    thread hand-offs: 2                          1 (idle, short job), else 2
    header parses: 3                             1 (a header over 64 KiB: 2)
    journal transactions per job: 1 + 1/batch    1/batch + 1/group, shared: 2.00 at 1 in
      (at least 1; DELETEs of acknowledged         flight, 0.16 at 32 (3,000 jobs, 2 workers,
      answers beside, up to 32 a DELETE)           an instant model; DELETEs as before)

Group commits never hold a job back waiting for company: whoever commits takes what is
there now. Durability is unchanged: a job is acknowledged only after the transaction that
admits it has committed, an answer is handed to the outbox only after the transaction that
records it has, and the outbox forgets a row only on its PUBACK (docs/protocol.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np
import xxhash

from edgeinfer.agent import failover
from edgeinfer.agent.batching import Batcher, Prepared, batchable, split_outputs
from edgeinfer.agent.config import JobsConfig
from edgeinfer.agent.diskalarm import DiskAlarm
from edgeinfer.agent.journal import Completion, DiskFull, Journal, OutMessage, StoredJob
from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.outbox import OutboxPublisher
from edgeinfer.agent.protocol import (
    HEADER_LENGTH_PROPERTY,
    REQUEST_PROPERTIES,
    Encoded,
    JobMeta,
    RawRequest,
    check_inputs,
    check_outputs,
    decode_request,
    encode_error,
    encode_response,
    mark_replayed,
    meta_of,
    peek_id,
    peek_meta,
)
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.contract.topics import has_wildcard
from edgeinfer.runtimes.base import BadInput, TensorSpec

log = logging.getLogger(__name__)

class SendNow(Protocol):
    """Direct publish (QoS 1, not kept on disk) for answers that cannot go through the
    journal: an intake that is full, a state disk that is full."""

    def __call__(self, topic: str, payload: bytes, correlation: bytes | None,
                 user_properties: Sequence[tuple[str, str]], /) -> None: ...


Ack = Callable[[int, int], None]

_json = msgspec.json.Encoder()

INTAKE_BATCH = 256
PRUNE_EVERY_S = 10.0
# A job's header is decoded in full by the intake when it is at most this long (a binary
# job's JSON part; a small JSON job); a longer one (a JSON job carrying its tensors as
# lists) is only peeked there and decoded by its worker, so that queued jobs are held as
# bytes and not as Python lists.
INTAKE_DECODE_MAX = 64 * 1024
# The intake runs a job itself, instead of handing it to a worker, when nothing else waits
# and a run of its model has lately taken at most this long (wall time of the whole run:
# checks, runtime, answer). Jobs that arrive meanwhile wait in the intake queue that long.
INLINE_MAX_S = 0.002
# While the state disk is full, the intake tries the held jobs and the waiting answers
# again after this long, doubling up to the maximum (a write that fails fails fast, but
# hundreds of them every few ms would be a busy loop).
DISK_RETRY_MIN_S = 0.05
DISK_RETRY_MAX_S = 1.0
# A retry round stops trying held jobs one by one after this many in a row found no room.
DISK_RETRY_TRIES = 4


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


@dataclass(frozen=True)
class Job:
    """A journaled job on its way to a worker: what the intake read of it, read once.

    `request` is the decoded OIP header (None when the intake did not decode it: a header
    over INTAKE_DECODE_MAX, an unreadable packet, a payload over the limit, or a header
    that does not decode, whose error is `problem`); the worker decodes only when the
    intake did not and a decode can still succeed.
    """

    key: str
    inbound: Inbound
    reply: Reply
    meta: JobMeta
    request: RawRequest | None
    problem: JobError | None
    priority: int
    deadline: float | None


@dataclass(frozen=True)
class _Done:
    """A job's answer waiting for its group commit."""

    key: str
    size: int  # the job's payload, for the queued-bytes count
    answer: Answer

    def completion(self) -> Completion:
        a = self.answer
        return Completion(self.key, a.executed, a.reply.topic, a.payload,
                          a.reply.correlation_data, a.user_properties)


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


_ANON = "anon:"  # the key of a job that can never come again


def oversize_text(size: int, limit: int) -> str:
    """INVALID_ARGUMENT's text for a job over jobs.max_message_bytes."""
    return (f"the job's payload of {size} bytes is over this agent's limit of {limit} bytes "
            "(jobs.max_message_bytes); send it in smaller jobs")


def job_key(inbound: Inbound, results_topic: str, job_id: str | None) -> str:
    """Identity for de-duplication: the job id within its reply topic.

    Two clients may both call a job "j-1"; their reply topics tell them apart. A job
    without an id is known by its correlation data, or not de-duplicated at all.
    """
    where = inbound.response_topic or results_topic
    if job_id is not None:
        return f"id:{where}|{job_id}"
    if inbound.correlation_data:
        digest = hashlib.sha256(where.encode() + b"\0" + inbound.correlation_data).hexdigest()
        return f"corr:{digest}"
    return f"{_ANON}{uuid.uuid4().hex}"


def request_digest(inbound: Inbound) -> bytes:
    """What a repeat of a job must match to be answered with its answer: the payload and
    the user properties that say what it asks for (model, header length). The reply topic
    is part of the key; the correlation data, the expiry and other user properties are
    not (a client's retry may carry new correlation data; the broker lowers the expiry).

    Computed for every job with an id or correlation data, on the intake thread, so it is
    XXH3-128 and not a cryptographic hash: measured on the 2-core reference machine, 12 us
    per 600 KB job against 340-600 us for sha256 (blake2b: 640 us), 0.07 us per 200 B job.
    Collision resistance against a deliberate attacker buys nothing here: the key holds the
    reply topic, so a forged match only ever replays an answer to the topic it went to.
    """
    digest = xxhash.xxh3_128()
    props = sorted(p for p in inbound.user_properties if p[0] in REQUEST_PROPERTIES)
    if props:
        digest.update(_json.encode(props))  # JSON: no two lists give the same bytes
    digest.update(b"\0")  # then the payload: no props and props give different streams
    digest.update(inbound.payload)
    return digest.digest()


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
        digest=None if key.startswith(_ANON) else request_digest(inbound),
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
        registry: ServedModels,
        metrics: Metrics,
        journal: Journal,
        outbox: OutboxPublisher,
        ack: Ack,
        send_now: SendNow,
        results_topic: str,
        reply_prefixes: Sequence[str],
        cfg: JobsConfig,
        alarm: DiskAlarm | None = None,
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
        # queue.SimpleQueue (C, one lock) and not queue.Queue (Python, a Condition and a new
        # lock per wait): the network thread's put and the intake's get are on every job's
        # path. Bounded by submit(), its only producer besides stop().
        self._intake: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
        self._intake_max = max(cfg.queue_size, 1024)
        self._work_q = WorkQueue()
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
        # A retired model's batcher goes with it.
        self._batchers: weakref.WeakKeyDictionary[ServingModel, Batcher] = (
            weakref.WeakKeyDictionary()
        )
        self._running: dict[str, threading.Event] = {}  # job key -> its cancel switch
        # Answers waiting for their group commit (_finish). Whoever takes them from the list
        # commits them: the worker that is `_committing` (it goes on while some are left)
        # or the intake, with its next batch of arrivals.
        self._answers: list[_Done] = []
        self._answers_lock = threading.Lock()
        self._committing = False
        # Recent wall time of a run per payload byte, per tensor model name (EWMA), for
        # _may_run_inline: per byte, since one model's jobs range from one row to a batch
        # of hundreds, and a rate learned on small jobs must not let a large one run inline.
        self._run_s_per_byte: dict[str, float] = {}
        self.executed = 0  # inference runs in this process
        self.duplicates = 0  # jobs answered from a stored answer
        self.rejected = 0  # jobs refused with RESOURCE_EXHAUSTED
        # The state disk full (docs/protocol.md, durability). Jobs that could not be
        # journaled are held here, in arrival order, NOT acknowledged, and journaled,
        # acknowledged and run once there is room. Kept in memory rather than left to the
        # broker to send again, because a QoS 1 message the agent has not acknowledged is
        # sent again only after a reconnect: dropping the link to get them back would also
        # resend every answer in flight and cut off every client's answers meanwhile, and
        # a gateway whose disk fills up often would reconnect often. Memory stays bounded
        # because the broker never has more than our Receive Maximum of unacknowledged
        # QoS 1 messages out to us (agent/mqtt_session.py RECEIVE_MAXIMUM); past
        # `max_queued_bytes` of held payloads a job is not held but only told, and the
        # broker gives it again after the next reconnect or restart. Intake thread only.
        self._alarm = alarm if alarm is not None else DiskAlarm(
            journal.path.parent, metrics, lambda kind, **fields: None)
        self._held: list[Inbound] = []
        self._held_bytes = 0
        # Answers that found the disk full wait in `_answers` (in front) with this set, and
        # workers take no new job meanwhile; the intake commits them when there is room.
        self._answers_blocked = False
        self._answers_flow = threading.Event()  # set: answers can be committed
        self._answers_flow.set()
        self._commit_went_through = True  # the last journal commit did (for the alarm)
        # Jobs handed to submit() (network threads) and jobs the intake is done with:
        # equal once every job handed over is journaled (and acknowledged) or refused.
        # (Each counter has one writing thread: submit's, the intake's.)
        self._submitted = 0
        self._turned_away = 0
        self._settled = 0

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
            with self._lock:
                self._first_correlation[job.key] = job.correlation
                self._queued += 1
                self._queued_bytes += len(job.payload)
            if job.attempts >= self._cfg.max_attempts:
                self._give_up(job)
                continue
            inbound = revived(job)
            self._enqueue(self._job(job.key, inbound, *self._read(inbound)))
        if pending:
            log.info("recovered %d unanswered job(s) from the journal", len(pending))
        return len(pending)

    def _give_up(self, job: StoredJob) -> None:
        """A job whose runs keep dying with the agent is answered, not run again."""
        inbound = revived(job)
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        text = (f"the job was started {job.attempts} times and the agent stopped each time "
                "before it finished (a crash or a watchdog restart); it is not run again")
        log.error("job %s: %s", job.key, text)
        payload = encode_error(peek_meta(job.payload, job.user_props).id, Code.INTERNAL, text)
        self._metrics.record_error(None, Code.INTERNAL.value)
        # As any answer: with the disk full it waits for room instead of failing the start.
        self._finish(job.key, inbound, Answer(reply, payload, (), False))

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
            self._work_q.put_stop()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- intake: network thread, then the intake thread ----------------------------------

    def intake_settled(self) -> bool:
        """Whether the intake is done with every job handed over so far."""
        return self._settled + self._turned_away >= self._submitted

    def submit(self, inbound: Inbound) -> None:
        """Network thread: hand over, never block."""
        self._submitted += 1
        if self._intake.qsize() >= self._intake_max:
            self._turned_away += 1
            self._refuse_now(inbound, "the agent's intake is full")
            return
        self._intake.put(inbound)

    def _refuse_now(self, inbound: Inbound, why: str,
                    code: Code = Code.RESOURCE_EXHAUSTED) -> None:
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        job_id = peek_meta(inbound.payload, inbound.user_properties).id
        self.rejected += 1
        self._metrics.record_error(None, code.value)
        text = f"{why}; retry later" if code is Code.RESOURCE_EXHAUSTED else why
        self._send_now(reply.topic, encode_error(job_id, code, text), reply.correlation_data, ())
        self._ack(inbound.mid, inbound.qos)

    def _intake_loop(self) -> None:
        last_prune = 0.0
        retry_s = DISK_RETRY_MIN_S
        while True:
            if self._held or self._answers_blocked:
                # The disk was full: try again after a while even if no job comes.
                try:
                    first = self._intake.get(timeout=retry_s)
                except queue.Empty:
                    first = _RETRY
                retry_s = min(retry_s * 2, DISK_RETRY_MAX_S)
            else:
                first = self._intake.get()
                retry_s = DISK_RETRY_MIN_S
            if first is None:
                return
            batch = [] if first is _RETRY else [first]
            while len(batch) < INTAKE_BATCH:
                try:
                    more = self._intake.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._intake.put(None)
                    break
                if more is not _RETRY:
                    batch.append(more)
            inline: Job | None = None
            try:
                with self._admitting:
                    if self._draining.is_set():
                        log.info("stopping: %d job(s) left with the broker for the next start",
                                 len(batch))
                        self._settled += len(batch)
                        continue
                    inline = self._admit_each_if_need_be(batch)
                self._commit_waiting()
                self._disk_status()
            except Exception:
                # Not acknowledged: the broker delivers these again after a reconnect.
                log.exception("journal write failed for %d job(s)", len(batch))
            self._settled += len(batch)
            if inline is not None:
                self._run_job(inline)
            now = time.monotonic()
            if now - last_prune > PRUNE_EVERY_S:
                last_prune = now
                # A DELETE needs room in the WAL too: with the disk full, pruned later.
                with contextlib.suppress(DiskFull):
                    self._journal.prune(time.time() - self._cfg.dedup_window_s)

    def _admit_each_if_need_be(self, batch: list[Inbound]) -> Job | None:
        """Admit the held jobs (the disk was full) and then `batch`, in arrival order."""
        told = {id(i) for i in self._held}
        jobs, self._held, self._held_bytes = self._held + batch, [], 0
        if not jobs:
            return None
        try:
            return self._admit(jobs, may_inline=True)
        except DiskFull as exc:
            self._no_room(exc)
        except Exception:
            log.exception("admitting %d job(s) failed; taking them one by one", len(jobs))
        no_room = 0  # in a row
        for inbound in jobs:
            if no_room >= DISK_RETRY_TRIES:
                self._hold(inbound, None, told=id(inbound) in told)
                continue
            try:
                self._admit([inbound], may_inline=False)
                no_room = 0
            except DiskFull as exc:
                no_room += 1
                self._hold(inbound, exc, told=id(inbound) in told)
            except Exception as exc:
                # Answered and acknowledged: a job that cannot even be journaled must not
                # come back with every reconnect, unanswered. The error's type and code
                # only: its text (SQLite's) is not for clients.
                log.exception("job could not be admitted")
                code = getattr(exc, "sqlite_errorname", None)
                self._refuse_now(inbound, "the agent could not journal the job ("
                                 + (code or type(exc).__name__) + ")", Code.INTERNAL)
        return None

    def _hold(self, inbound: Inbound, exc: DiskFull | None, *, told: bool) -> None:
        """A job the full disk would not take: told so (once), kept unacknowledged."""
        if exc is not None:
            self._no_room(exc)
        if not told:
            reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
            job_id = peek_meta(inbound.payload, inbound.user_properties).id
            where = exc.state_dir if exc is not None else self._journal.path.parent
            text = (f"the agent's state disk is full (state_dir {where}): the job was not "
                    "accepted; retry later, with the same id to be answered only once (the "
                    "broker keeps this delivery and the agent runs it when there is room)")
            self._metrics.record_error(None, Code.UNAVAILABLE.value)
            # Directly: the outbox is on the full disk. `held` says an answer follows.
            self._send_now(reply.topic, encode_error(job_id, Code.UNAVAILABLE, text,
                                                     held=True),
                           reply.correlation_data, ())
        size = len(inbound.payload)
        if self._held_bytes + size > self._cfg.max_queued_bytes:
            log.warning("job not held in memory (%d bytes held): the broker delivers it "
                        "again after the next reconnect", self._held_bytes)
            return
        self._held.append(inbound)
        self._held_bytes += size

    def _disk_status(self) -> None:
        """After an intake round: clear the alarm once nothing waits for room; figures."""
        waiting = self._answers_waiting()
        self._metrics.disk_backlog(len(self._held), waiting)
        if not self._held and not self._answers_blocked and self._commit_went_through:
            self._alarm.clear("journal")

    def _no_room(self, exc: DiskFull) -> None:
        self._commit_went_through = False
        self._alarm.full("journal", exc)

    def _answers_waiting(self) -> int:
        with self._answers_lock:
            return len(self._answers) if self._answers_blocked else 0

    def _admit(self, batch: list[Inbound], *, may_inline: bool) -> Job | None:
        """Journal arriving jobs, together with the answers waiting for a commit (one
        transaction), then acknowledge them. Returns the one new job when the intake should
        run it itself (_may_run_inline); the others go to the work queue."""
        with self._lock:
            room = self._cfg.queue_size - self._queued
            room_bytes = self._cfg.max_queued_bytes - self._queued_bytes
        accepted: list[tuple[str, Inbound, JobMeta, RawRequest | None, JobError | None]] = []
        for inbound in batch:
            if inbound.oversize:  # never journaled: its payload was dropped unread
                self._refuse_oversize(inbound)
                continue
            if len(accepted) >= room or len(inbound.payload) > room_bytes:
                self._refuse_journaled(inbound)
                continue
            room_bytes -= len(inbound.payload)
            meta, req, problem = self._read(inbound)
            accepted.append((job_key(inbound, self._results_topic, meta.id), inbound, meta, req,
                             problem))
        answers = self._take_answers()
        try:
            decisions, seqs = self._journal.commit([stored(i, k) for k, i, *_ in accepted],
                                                   [d.completion() for d in answers])
        except Exception:
            self._record_answers(answers)  # on their own, so the failure is the batch's
            raise
        self._commit_went_through = True
        self._answered(answers, seqs)
        fresh: list[Job] = []
        new_bytes = 0
        for (key, inbound, meta, req, problem), decision in zip(accepted, decisions, strict=True):
            if decision.kind == "new":
                new_bytes += len(inbound.payload)
                with self._lock:
                    self._first_correlation[key] = inbound.correlation_data
                fresh.append(self._job(key, inbound, meta, req, problem))
            elif decision.kind == "conflict":
                self._refuse_reused_key(inbound, meta)
            elif decision.kind == "duplicate_done":
                self.duplicates += 1
                self._replay(key, inbound.correlation_data)
            else:  # duplicate_pending: the answer is on the way to the first correlation
                self.duplicates += 1
                with self._lock:
                    running = key in self._first_correlation
                    if running and self._first_correlation[key] != inbound.correlation_data:
                        self._repeats.setdefault(key, []).append(inbound.correlation_data)
                # Finished between the journal's look and ours: its answer is stored now.
                if not running:
                    self._replay(key, inbound.correlation_data)
        with self._lock:
            self._queued += len(fresh)
            self._queued_bytes += new_bytes
        for _, inbound, *_ in accepted:
            self._ack(inbound.mid, inbound.qos)
        inline = None
        if may_inline and len(fresh) == 1 and self._may_run_inline(fresh[0]):
            inline = fresh.pop()
        for job in fresh:
            self._enqueue(job)
        return inline

    def _read(self, inbound: Inbound) -> tuple[JobMeta, RawRequest | None, JobError | None]:
        """A job's header, parsed once for its whole way: its meta (id, priority, timeout)
        and the decoded request, or the JobError that decoding it gave. A header over
        INTAKE_DECODE_MAX, an unreadable packet or a payload over the limit is only peeked."""
        payload, props = inbound.payload, inbound.user_properties
        if (inbound.unreadable is None and len(payload) <= self._cfg.max_message_bytes
                and _header_length(inbound) <= INTAKE_DECODE_MAX):
            try:
                req = decode_request(payload, props)
                meta = meta_of(req)
                req.timeout_ms, req.sent_at_ms  # noqa: B018 - their checks raise JobError
            except JobError as err:
                return peek_meta(payload, props), None, err
            except Exception:
                log.exception("job header could not be read at intake; its worker tries")
            else:
                return meta, req, None
        return peek_meta(payload, props), None, None

    def _job(self, key: str, inbound: Inbound, meta: JobMeta, request: RawRequest | None,
             problem: JobError | None) -> Job:
        priority = meta.priority if meta.priority is not None else self._cfg.default_priority
        return Job(key, inbound, route_reply(inbound, self._results_topic, self._reply_prefixes),
                   meta, request, problem, priority,
                   _deadline(inbound, meta.timeout_ms, meta.sent_at_ms))

    def _enqueue(self, job: Job) -> None:
        self._work_q.put(job)

    def _may_run_inline(self, job: Job) -> bool:
        """Whether the intake should run `job` itself rather than wake a worker for it: the
        intake is not the thread that owns the broker's socket (that one only parses and
        hands over), so a run here never holds up reading, PINGs or PUBACKs; it only holds
        up the admission of jobs that arrive meanwhile, which is why it is done only for a
        job whose run should take at most INLINE_MAX_S (its model's recent time per payload
        byte times its size: a fixed cost per run makes that high for larger jobs, which is
        the side to err on), when no job waits (intake and work queues empty) and no worker
        is running one (so none of the model's instances is taken), and when the outbox has
        room (the workers' backpressure)."""
        req = job.request
        if req is None or job.problem is not None or job.meta.cancel is not None:
            return False
        rate = self._run_s_per_byte.get(req.model_name)
        if rate is None or rate * len(job.inbound.payload) > INLINE_MAX_S:
            return False
        if not self._intake.empty() or not self._work_q.empty():
            return False
        with self._lock:
            if self._busy_since:
                return False
        return self._outbox.has_room() and self._answers_flow.is_set()

    def _replay(self, key: str, correlation: bytes | None) -> None:
        """Send a done job's stored answer again, marked `replayed`, to `correlation`."""
        answer = self._journal.stored_answer(key)
        if answer is None:
            return
        try:
            marked = mark_replayed(answer.payload, answer.user_props)
        except (msgspec.DecodeError, ValueError, KeyError):
            # Every stored answer is one of ours, so this is a bug; the answer still goes.
            log.exception("job %s: stored answer could not be marked replayed", key)
            marked = Encoded(answer.payload, answer.user_props)
        self._send_out(answer.topic, marked.payload, correlation, marked.user_properties)

    def _refuse_reused_key(self, inbound: Inbound, meta: JobMeta) -> None:
        """A job under the key of an earlier, different request: refused, never answered
        with the other request's answer. Acknowledged with the batch, like any job."""
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        window = f"{self._cfg.dedup_window_s:g}"
        if meta.id is not None:
            text = (f"job id {meta.id!r} was already used for a different request within the "
                    f"last {window} s; use a new id")
        else:
            text = ("this correlation data was already used for a different request within "
                    f"the last {window} s; use new correlation data or give the job an id")
        self._metrics.record_error(None, Code.INVALID_ARGUMENT.value)
        self._send_out(reply.topic, encode_error(meta.id, Code.INVALID_ARGUMENT, text),
                       reply.correlation_data, ())

    def _refuse_oversize(self, inbound: Inbound) -> None:
        """A job over jobs.max_message_bytes, its payload dropped unread by the session
        (Inbound.oversize): refused through the outbox, acknowledged, never journaled."""
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        payload = encode_error(None, Code.INVALID_ARGUMENT, oversize_text(
            inbound.oversize, self._cfg.max_message_bytes))
        self.rejected += 1
        self._metrics.record_error(None, Code.INVALID_ARGUMENT.value)
        self._journal.enqueue(reply.topic, payload, 1, reply.correlation_data)
        self._outbox.added(len(payload))
        self._ack(inbound.mid, inbound.qos)

    def _refuse_journaled(self, inbound: Inbound) -> None:
        """Queue full: the refusal goes through the outbox, and the job is not kept."""
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        payload = encode_error(
            peek_meta(inbound.payload, inbound.user_properties).id,
            Code.RESOURCE_EXHAUSTED,
            f"job queue is full ({self._cfg.queue_size} jobs or "
            f"{self._cfg.max_queued_bytes} bytes waiting); retry later",
        )
        self.rejected += 1
        self._metrics.record_error(None, Code.RESOURCE_EXHAUSTED.value)
        self._send_out(reply.topic, payload, reply.correlation_data, ())
        self._ack(inbound.mid, inbound.qos)

    def _send_out(self, topic: str, payload: bytes, correlation: bytes | None,
                  user_properties: Sequence[tuple[str, str]]) -> None:
        """A message that is no job's final answer, through the outbox; directly when the
        disk is full (it is then lost if the link drops before its PUBACK: a refusal, a
        replay or a partial answer, which the client's retry or the final answer covers)."""
        try:
            self._journal.enqueue(topic, payload, 1, correlation, user_properties)
        except DiskFull as exc:
            # No alarm from here: only the journal's commits raise and clear it.
            log.warning("sent without the outbox: %s", exc)
            self._send_now(topic, payload, correlation, user_properties)
            return
        self._outbox.added(len(payload))

    # --- workers -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._work_q.get()
            if job is None:
                return
            # Backpressure: answers wait on disk for the broker; do not pile up more. Nor
            # in memory, while answers wait for room on a full disk.
            while not self._outbox.wait_room(0.5) or not self._answers_flow.wait(0.5):
                if self._stopping.is_set():
                    break
            self._run_job(job)

    def _run_job(self, job: Job) -> None:
        """A worker's (or the intake's) turn with one job, seen by longest_job meanwhile."""
        name = threading.current_thread().name
        with self._lock:
            self._busy_since[name] = time.monotonic()
        try:
            self._process(job)
        finally:
            with self._lock:
                self._busy_since.pop(name, None)

    def _process(self, job: Job) -> None:
        """Answer one job: at once, or by handing it to its model's batcher."""
        if job.meta.cancel is not None:
            self._finish(job.key, job.inbound, self._cancel(job))
            return
        try:
            prepared = self._prepare(job)
        except _Answered as done:
            self._finish(job.key, job.inbound, done.answer)
            return
        batcher = self._batcher_for(prepared)
        if batcher is None:
            started = time.monotonic()
            self._run_batch([prepared])
            if prepared.model.spec.task == "tensor":
                rate = (time.monotonic() - started) / max(1, len(prepared.inbound.payload))
                name = prepared.request.model_name
                before = self._run_s_per_byte.get(name)
                self._run_s_per_byte[name] = rate if before is None else 0.8 * before + 0.2 * rate
        else:
            batcher.offer(prepared)

    def _cancel(self, job: Job) -> Answer:
        """A request to stop a running job of the same client (same reply topic)."""
        inbound, meta, reply = job.inbound, job.meta, job.reply
        assert meta.cancel is not None
        target = job_key(inbound, self._results_topic, meta.cancel)
        with self._lock:
            event = self._running.get(target)
        if event is not None:
            event.set()
        body = {"model_name": "", "model_version": "", "outputs": [],
                "parameters": {"cancel": meta.cancel, "found": event is not None}}
        if meta.id is not None:
            body["id"] = meta.id
        return Answer(reply, _json.encode(body), (), False)

    def _batcher_for(self, job: Prepared) -> Batcher | None:
        model = job.model
        policy = model.spec.batching
        if policy.max_batch <= 1 or model.spec.task != "tensor":
            return None
        with self._lock:
            batcher = self._batchers.get(model)
            if batcher is None:
                if not batchable(model.session.inputs, model.session.outputs):
                    return None
                batcher = Batcher(policy.max_batch, policy.max_delay_ms, self._run_batch)
                self._batchers[model] = batcher
        return batcher

    def _prepare(self, job: Job) -> Prepared:
        """Check a job against its model (decoding it if the intake did not); raises
        _Answered when it will not run."""
        key, inbound, reply = job.key, job.inbound, job.reply
        job_id: str | None = None
        model: ServingModel | None = None
        try:
            if reply.refusal is not None:
                raise JobError(Code.INVALID_ARGUMENT, reply.refusal)
            if inbound.unreadable is not None:  # its MQTT packet could not be read in full
                raise JobError(Code.INVALID_ARGUMENT, inbound.unreadable)
            if len(inbound.payload) > self._cfg.max_message_bytes:
                # Journaled under a larger limit before a restart (the session refuses
                # the others before they are held whole: _refuse_oversize).
                raise JobError(Code.INVALID_ARGUMENT, oversize_text(
                    len(inbound.payload), self._cfg.max_message_bytes))
            if job.problem is not None:
                raise job.problem
            if job.request is not None:  # decoded, timeout checked, by the intake
                req, deadline = job.request, job.deadline
            else:
                req = decode_request(inbound.payload, inbound.user_properties)
                deadline = _deadline(inbound, req.timeout_ms, req.sent_at_ms)
            job_id = req.id
            _check_deadline(deadline)
            model = self._registry.acquire(req.model_name, req.model_version)
            session = model.session
            pipeline = model.pipeline()
            in_specs = pipeline.inputs() if pipeline is not None else session.inputs
            out_specs = pipeline.outputs() if pipeline is not None else session.outputs
            knobs: list[TensorSpec] = getattr(pipeline, "optional_inputs", list)()
            arrays = check_inputs(req, in_specs, model.label, self._cfg.max_tensor_elements,
                                  optional=knobs)
            wanted = check_outputs(req, out_specs, model.label)
            return Prepared(key, inbound, reply, req, model, arrays, wanted, deadline)
        except Exception as exc:
            if model is not None:
                model.release()
            if job_id is None and len(inbound.payload) <= self._cfg.max_message_bytes:
                job_id = peek_id(inbound.payload)  # the request failed before its id was read
            label = model.label if model is not None else None
            raise _Answered(self._error_answer(reply, job_id, label, exc, False)) from None

    def _run_batch(self, jobs: list[Prepared]) -> None:
        """Run jobs of one model (one, or a batch) and answer each. Never raises."""
        try:
            live: list[Prepared] = []
            for job in jobs:
                try:
                    _check_deadline(job.deadline)
                    live.append(job)
                except JobError as err:
                    self._finish_prepared(job, self._error_answer(
                        job.reply, job.request.id, job.model.label, err, False))
            if not live:
                return
            self._journal.running([(job.key, job.inbound.received_wall) for job in live])
            try:
                self._run_live(live)
            finally:
                self._journal.done_running()
        except Exception:
            # Jobs not answered stay in the journal and run again after a restart.
            log.exception("batch of %d job(s) failed", len(jobs))

    def _run_live(self, live: list[Prepared]) -> None:
        """Run jobs past their deadline check and answer each."""
        model = live[0].model
        session = model.session
        with self._lock:
            self.executed += len(live)
        pipeline = model.pipeline()
        try:
            with model.instances:  # the manifest's `instances`: runs at once on the session
                started = time.monotonic()  # queue time includes the wait for an instance
                results = self._infer(model, pipeline, live)
        except Exception as exc:
            if isinstance(exc, BadInput) or (pipeline is not None and isinstance(exc, ValueError)):
                # Inputs the model cannot take (by the runtime's exception type, past what
                # check_inputs saw), or the pipeline's word on bad media (a truncated JPEG,
                # not audio, ...): the client's error, never counted toward a failover.
                failure = JobError(Code.INVALID_ARGUMENT, f"{model.label}: {exc}")
            else:
                failover.note_failure(model, exc)  # demoted after K in a row (failover.py)
                failure = JobError(Code.INTERNAL,
                                   f"{session.runtime} failed on {model.label}: {exc}")
            for job in live:
                self._finish_prepared(job, self._error_answer(
                    job.reply, job.request.id, model.label, failure, True))
            return
        infer_ms = (time.monotonic() - started) * 1000.0
        failover.note_outputs(model, [j.arrays for j in live], results)
        for job, outputs in zip(live, results, strict=True):
            queue_ms = (started - job.inbound.received) * 1000.0
            params: dict[str, object] = {
                "runtime": session.runtime,
                "device": session.device,
                "queue_ms": round(queue_ms, 3),
                "infer_ms": round(infer_ms, 3),
            }
            if len(live) > 1:
                params["batch_size"] = sum(j.rows for j in live)
            if pipeline is not None and job.request.parameters.get("stream"):
                params["sequence_end"] = True
            try:
                encoded = encode_response(job.request, model.spec.name, model.spec.version,
                                          outputs, params)
                answer = Answer(job.reply, encoded.payload, encoded.user_properties, True)
                self._metrics.record_ok(model.label, queue_ms, infer_ms,
                                        (time.monotonic() - job.inbound.received) * 1000.0)
            except Exception as exc:
                answer = self._error_answer(job.reply, job.request.id, model.label, exc, True)
            self._finish_prepared(job, answer)

    def _infer(self, model: ServingModel, pipeline: Any, live: list[Prepared]
               ) -> list[dict[str, np.ndarray]]:
        """The outputs of each job: through its pipeline, alone, or merged into one batch."""
        if pipeline is not None:
            (job,) = live  # pipelines are never batched
            produced = self._run_pipeline(pipeline, job)
            return [{k: v for k, v in produced.items() if job.wanted is None or k in job.wanted}]
        if len(live) == 1:
            return [model.session.infer(live[0].arrays, live[0].wanted)]
        merged = {name: np.concatenate([j.arrays[name] for j in live], axis=0)
                  for name in live[0].arrays}
        return split_outputs(model.session.infer(merged, live[0].wanted), [j.rows for j in live])

    def _run_pipeline(self, pipeline: Any, job: Prepared) -> dict[str, np.ndarray]:
        """A pipeline's answer; a streaming one sends its partial answers on the way.

        Text generation streams when the request says `"parameters": {"stream": true}`:
        every chunk but the last goes out at once with `sequence_end: false` (through the
        outbox, so a restart does not lose them), and the last is the job's final answer.
        A running job can be stopped by a request with `"parameters": {"cancel": "<id>"}`.
        """
        if not hasattr(pipeline, "run_stream"):
            return dict(pipeline.run(job.model.pipeline_session, job.arrays))
        cancel = threading.Event()
        with self._lock:
            self._running[job.key] = cancel
        try:
            if not job.request.parameters.get("stream"):
                return dict(pipeline.run(job.model.pipeline_session, job.arrays, cancel))
            last: dict[str, np.ndarray] | None = None
            for chunk in pipeline.run_stream(job.model.pipeline_session, job.arrays, cancel):
                if last is not None:
                    self._send_partial(job, last)
                last = chunk
            assert last is not None  # the stream always ends with a chunk
            return last
        finally:
            with self._lock:
                self._running.pop(job.key, None)

    def _send_partial(self, job: Prepared, outputs: dict[str, np.ndarray]) -> None:
        model = job.model
        encoded = encode_response(job.request, model.spec.name, model.spec.version, outputs,
                                  {"sequence_end": False, "runtime": model.session.runtime,
                                   "device": model.session.device})
        self._send_out(job.reply.topic, encoded.payload, job.reply.correlation_data,
                       encoded.user_properties)

    def _error_answer(self, reply: Reply, job_id: str | None, model_label: str | None,
                      exc: Exception, executed: bool) -> Answer:
        if isinstance(exc, JobError):
            err = exc
        else:
            # A bug of ours must still give the job its one answer.
            log.error("job failed unexpectedly", exc_info=exc)
            err = JobError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        self._metrics.record_error(model_label, err.code.value)
        log.debug("job %s: %s %s", job_id, err.code.value, err.message)
        return Answer(reply, encode_error(job_id, err.code, err.message), (), executed)

    def _finish_prepared(self, job: Prepared, answer: Answer) -> None:
        job.model.release()
        self._finish(job.key, job.inbound, answer)

    def _finish(self, key: str, inbound: Inbound, answer: Answer) -> None:
        """Record the answer (journal and outbox together) in a group commit; answer
        waiting repeats. Never waits for company: the first to bring an answer while no
        commit is under way commits every answer there is, and again while more came
        meanwhile; one that brings it during a commit leaves it for that committer (or
        for the intake's next admission) and goes back to work at once."""
        with self._answers_lock:
            self._answers.append(_Done(key, len(inbound.payload), answer))
            if self._committing or self._answers_blocked:  # blocked: the intake retries
                return
            self._committing = True
        self._commit_loop()

    def _commit_loop(self) -> None:
        """The committer's loop (its caller set `_committing`): commit what waits until
        nothing does, or until the disk has no room for it."""
        try:
            while True:
                with self._answers_lock:
                    group, self._answers = self._answers, []
                    if not group:
                        self._committing = False
                        return
                if not self._record_answers(group):
                    with self._answers_lock:
                        self._committing = False
                    return
        except BaseException:
            with self._answers_lock:
                self._committing = False
            raise

    def _commit_waiting(self) -> None:
        """The intake's turn, while answers wait for room on the disk: try them again."""
        with self._answers_lock:
            if not self._answers_blocked or self._committing:
                return
            self._committing = True
        if self._commit_loop_once():
            self._unblock_answers()

    def _commit_loop_once(self) -> bool:
        """Under `_committing`: one try at what waits; True when it was recorded."""
        try:
            with self._answers_lock:
                group, self._answers = self._answers, []
            return self._record_answers(group)
        finally:
            with self._answers_lock:
                self._committing = False

    def _unblock_answers(self) -> None:
        """An answer commit went through: if answers were held back by a full disk, let
        them flow, and commit those that came meanwhile (nobody else would: a worker that
        brought one while blocked left it)."""
        with self._answers_lock:
            if not self._answers_blocked:
                return
            self._answers_blocked = False
            self._answers_flow.set()
            if self._committing or not self._answers:
                return
            self._committing = True
        self._commit_loop()

    def _take_answers(self) -> list[_Done]:
        """For the intake's admission: the answers there are, unless they wait for room on
        the disk (then `_commit_waiting` tries them alone, and the jobs go in without)."""
        with self._answers_lock:
            if self._answers_blocked:
                return []
            group, self._answers = self._answers, []
        return group

    def _record_answers(self, group: list[_Done]) -> bool:
        """Commit a group of answers in one transaction (one by one if that fails) and hand
        them to the outbox. Never raises. When the disk has no room, the group goes back in
        front of the waiting answers, marked blocked, and False is returned: the intake
        tries again (with backoff) until it is recorded; no answer is dropped. Any other
        failure leaves an answer's job in the journal, unanswered, to run again after a
        restart."""
        if not group:
            return True
        try:
            seqs: list[int | None] = list(self._journal.commit((), [d.completion() for d in group])[1])
        except DiskFull as exc:
            self._keep_for_room(group, exc)
            return False
        except Exception:
            log.exception("recording %d answer(s) together failed; one by one", len(group))
            seqs = []
            kept: list[_Done] = []
            full: DiskFull | None = None
            for done in group:
                try:
                    seqs.append(self._journal.commit((), [done.completion()])[1][0])
                except DiskFull as exc:
                    full = exc
                    kept.append(done)
                    seqs.append(None)
                except Exception:
                    log.exception("job %s: could not record its answer", done.key)
                    seqs.append(None)
            if full is not None:
                recorded = [(d, q) for d, q in zip(group, seqs, strict=True)
                            if not any(d is k for k in kept)]
                self._answered([d for d, _ in recorded], [q for _, q in recorded])
                self._keep_for_room(kept, full)
                return False
        else:
            self._commit_went_through = True
        self._answered(group, seqs)
        return True

    def _keep_for_room(self, group: list[_Done], exc: DiskFull) -> None:
        """Answers the disk had no room for: back in front of those waiting, blocked."""
        self._no_room(exc)
        with self._answers_lock:
            self._answers[:0] = group
            self._answers_blocked = True
            self._answers_flow.clear()
        self._intake.put(_RETRY)  # the intake may be waiting for a job that never comes

    def _answered(self, group: Sequence[_Done], seqs: Sequence[int | None]) -> None:
        """After the commit of `group`: its answers to the outbox, in seq order; repeats
        that waited for them answered; the jobs no longer counted as queued."""
        try:
            msgs = [OutMessage(seq, d.answer.reply.topic, d.answer.payload, 1,
                               d.answer.reply.correlation_data, d.answer.user_properties)
                    for d, seq in zip(group, seqs, strict=True) if seq is not None]
            if msgs:
                self._outbox.hand_over_many(msgs)
            for done, seq in zip(group, seqs, strict=True):
                if seq is None:
                    continue
                with self._lock:
                    self._first_correlation.pop(done.key, None)
                    repeats = self._repeats.pop(done.key, [])
                for correlation in repeats:
                    self._replay(done.key, correlation)
        except Exception:
            # Recorded: the outbox thread sends them from the table.
            log.exception("answers of %d job(s) recorded but not handed over", len(group))
            self._outbox.wake()
        finally:
            with self._lock:
                self._queued -= len(group)
                self._queued_bytes -= sum(d.size for d in group)


_RETRY = Inbound("", b"", 0, False, None, None, (), None, 0.0, 0.0)  # the intake's wake-up


class WorkQueue:
    """Jobs by priority (lower number first), then earliest deadline, then arrival."""

    _STOP = 2**62  # after every job: a stop lets the queued jobs run first

    def __init__(self) -> None:
        self._q: queue.PriorityQueue[tuple[int, float, int, Job | None]] = queue.PriorityQueue()
        self._seq = itertools.count()

    def put(self, job: Job) -> None:
        self._q.put((job.priority, math.inf if job.deadline is None else job.deadline,
                     next(self._seq), job))

    def put_stop(self) -> None:
        self._q.put((self._STOP, math.inf, next(self._seq), None))

    def get(self) -> Job | None:
        return self._q.get()[3]

    def empty(self) -> bool:
        return self._q.empty()


class _Answered(Exception):
    """A job answered before it could run (an error); carries the answer."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("answered")
        self.answer = answer


def _header_length(inbound: Inbound) -> int:
    """The length of a job's JSON header: Inference-Header-Content-Length when it is a
    usable number, else the whole payload."""
    text = inbound.user_property(HEADER_LENGTH_PROPERTY)
    if text is not None and text.isascii() and text.isdecimal() and int(text) > 0:
        return min(int(text), len(inbound.payload))
    return len(inbound.payload)


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
