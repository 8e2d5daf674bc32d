"""The intake: admission of arriving jobs, journaled before they are acknowledged.

The network thread only puts a job on the intake queue (`submit`). The intake thread
takes what has arrived (up to INTAKE_BATCH), reads each job's OIP header once
(agent/headers.py: the typed `Job` carries it, its reply, priority and deadline to
whoever runs it), journals the jobs together in one transaction, with the answers
waiting for their group commit, and only then acknowledges them to the broker; a job
seen before is answered from its stored answer. New jobs go to the work queue, or, when
one is short and nothing waits, the intake runs it itself. Where an answer goes is
decided first, so even a job that cannot be parsed is answered (on `.../results` when it
named no usable Response Topic). After a restart, `recover` queues what the journal holds unanswered.

The state disk full (docs/protocol.md, durability): jobs that could not be journaled are
held here, in arrival order, NOT acknowledged, and journaled, acknowledged and run once
there is room. Kept in memory rather than left to the broker to send again, because a
QoS 1 message the agent has not acknowledged is sent again only after a reconnect:
dropping the link to get them back would also resend every answer in flight and cut off
every client's answers meanwhile, and a gateway whose disk fills up often would reconnect
often. Memory stays bounded because the broker never has more than our Receive Maximum of
unacknowledged QoS 1 messages out to us (agent/mqtt_session/ RECEIVE_MAXIMUM); past
`max_queued_bytes` of held payloads a job is not held but only told, and the broker gives
it again after the next reconnect or restart. Held jobs are touched by the intake only.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgeinfer.agent.answers import Answers, SendNow
from edgeinfer.agent.config import JobsConfig
from edgeinfer.agent.headers import Header, peek_job_id, read_header
from edgeinfer.agent.inflight import Ledger
from edgeinfer.agent.jobs import (
    Answer,
    Job,
    WorkQueue,
    deadline_of,
    job_key,
    oversize_text,
    revived,
    route_reply,
    stored,
)
from edgeinfer.agent.journal import DiskFull, Journal, StoredJob
from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.outbox import OutboxPublisher
from edgeinfer.agent.protocol import JobMeta, encode_error
from edgeinfer.agent.queries import Queries
from edgeinfer.agent.workers import Workers
from edgeinfer.contract.errors import Code

log = logging.getLogger(__name__)

Ack = Callable[[int, int], None]

INTAKE_BATCH = 256
PRUNE_EVERY_S = 10.0
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

_RETRY = Inbound("", b"", 0, False, None, None, (), None, 0.0, 0.0)  # the intake's wake-up


@dataclass
class Arrival:
    """A job from the network, its header read at most once, when first needed (a job
    refused for a full queue is only peeked at for its id)."""

    inbound: Inbound
    header: Header | None = None


class Intake:
    def __init__(self, journal: Journal, outbox: OutboxPublisher, answers: Answers,
                 ledger: Ledger, workers: Workers, work_q: WorkQueue, metrics: Metrics,
                 ack: Ack, send_now: SendNow, results_topic: str,
                 reply_prefixes: Sequence[str], cfg: JobsConfig, queries: Queries) -> None:
        self._journal = journal
        self._outbox = outbox
        self._answers = answers
        self._ledger = ledger
        self._workers = workers
        self._work_q = work_q
        self._metrics = metrics
        self._ack = ack
        self._send_now = send_now
        self._results_topic = results_topic
        self._reply_prefixes = tuple(reply_prefixes)
        self._cfg = cfg
        self._queries = queries
        # queue.SimpleQueue (C, one lock) and not queue.Queue (Python, a Condition and a new
        # lock per wait): the network thread's put and the intake's get are on every job's
        # path. Bounded by submit(), its only producer besides stop() and wake().
        self._queue: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
        self._max = max(cfg.queue_size, 1024)
        # Set by drain(): new jobs are then neither journaled nor acknowledged, so the broker
        # keeps them for this device's next session. Held while a batch is admitted.
        self.draining = threading.Event()
        self.admitting = threading.Lock()
        self._held: list[Arrival] = []  # the disk was full (the module's docstring)
        self._held_bytes = 0
        # Jobs handed to submit() and jobs the intake is done with: equal once every job
        # handed over is journaled (and acknowledged) or refused. submit() runs on several
        # threads (device and pool sessions, the HTTP endpoint): its counts take a lock.
        self._submit_lock = threading.Lock()
        self._submitted = self._turned_away = self._settled = 0
        self.duplicates = 0  # jobs answered from a stored answer
        self.rejected = 0  # jobs refused with RESOURCE_EXHAUSTED

    # --- network thread ------------------------------------------------------------------

    def submit(self, inbound: Inbound) -> None:
        """Network thread: hand over, never block."""
        with self._submit_lock:
            self._submitted += 1
            full = self._queue.qsize() >= self._max
            self._turned_away += full
        if full:
            self._refuse_now(Arrival(inbound), "the agent's intake is full")
            return
        self._queue.put(inbound)

    def settled(self) -> bool:
        """Whether the intake is done with every job handed over so far."""
        return self._settled + self._turned_away >= self._submitted

    def wake(self) -> None:
        """Have the intake look again (answers wait for room on the disk)."""
        self._queue.put(_RETRY)

    def stop(self) -> None:
        self._queue.put(None)

    # --- after a restart -----------------------------------------------------------------

    def recover(self) -> int:
        """Queue what the journal holds unanswered from before a restart."""
        pending = self._journal.pending()
        for job in pending:
            self._ledger.first_seen(job.key, job.correlation)
            self._ledger.count_in(1, len(job.payload))
            if job.attempts >= self._cfg.max_attempts:
                self._give_up(job)
                continue
            inbound = revived(job)
            self._work_q.put(self._job(job.key, inbound,
                                       read_header(inbound, self._cfg.max_message_bytes)))
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
        payload = encode_error(peek_job_id(job.payload, job.user_props), Code.INTERNAL, text)
        self._metrics.record_error(None, Code.INTERNAL.value)
        # As any answer: with the disk full it waits for room instead of failing the start.
        self._answers.finish(job.key, len(inbound.payload), Answer(reply, payload, (), False))

    # --- the intake thread ---------------------------------------------------------------

    def loop(self) -> None:
        last_prune = 0.0
        retry_s = DISK_RETRY_MIN_S
        while True:
            if self._held or self._answers.blocked:
                # The disk was full: try again after a while even if no job comes.
                try:
                    first = self._queue.get(timeout=retry_s)
                except queue.Empty:
                    first = _RETRY
                retry_s = min(retry_s * 2, DISK_RETRY_MAX_S)
            else:
                first = self._queue.get()
                retry_s = DISK_RETRY_MIN_S
            if first is None:
                return
            batch = [] if first is _RETRY else [Arrival(first)]
            while len(batch) < INTAKE_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                if more is not _RETRY:
                    batch.append(Arrival(more))
            # Health and metadata queries first, never journaled (agent/queries.py: why here).
            jobs = [a for a in batch if not self._queries.answered(a.inbound)]
            self._settled += len(batch) - len(jobs)
            batch = jobs
            inline: Job | None = None
            try:
                with self.admitting:
                    if self.draining.is_set():
                        log.info("stopping: %d job(s) left with the broker for the next start",
                                 len(batch))
                        self._settled += len(batch)
                        continue
                    inline = self._admit_each_if_need_be(batch)
                self._answers.commit_waiting()
                self._disk_status()
            except Exception:
                # Not acknowledged: the broker delivers these again after a reconnect.
                log.exception("journal write failed for %d job(s)", len(batch))
            self._settled += len(batch)
            if inline is not None:
                self._workers.run_job(inline)
            now = time.monotonic()
            if now - last_prune > PRUNE_EVERY_S:
                last_prune = now
                # A DELETE needs room in the WAL too: with the disk full, pruned later.
                with contextlib.suppress(DiskFull):
                    self._journal.prune(time.time() - self._cfg.dedup_window_s)

    def _admit_each_if_need_be(self, batch: list[Arrival]) -> Job | None:
        """Admit the held jobs (the disk was full) and then `batch`, in arrival order."""
        told = {id(a) for a in self._held}
        jobs, self._held, self._held_bytes = self._held + batch, [], 0
        if not jobs:
            return None
        try:
            return self._admit(jobs, may_inline=True)
        except DiskFull as exc:
            self._answers.no_room(exc)
        except Exception:
            log.exception("admitting %d job(s) failed; taking them one by one", len(jobs))
        no_room = 0  # in a row
        for arrival in jobs:
            if no_room >= DISK_RETRY_TRIES:
                self._hold(arrival, None, told=id(arrival) in told)
                continue
            try:
                self._admit([arrival], may_inline=False)
                no_room = 0
            except DiskFull as exc:
                no_room += 1
                self._hold(arrival, exc, told=id(arrival) in told)
            except Exception as exc:
                # Answered and acknowledged: a job that cannot even be journaled must not
                # come back with every reconnect, unanswered. The error's type and code
                # only: its text (SQLite's) is not for clients.
                log.exception("job could not be admitted")
                code = getattr(exc, "sqlite_errorname", None)
                self._refuse_now(arrival, "the agent could not journal the job ("
                                 + (code or type(exc).__name__) + ")", Code.INTERNAL)
        return None

    def _hold(self, arrival: Arrival, exc: DiskFull | None, *, told: bool) -> None:
        """A job the full disk would not take: told so (once), kept unacknowledged."""
        if exc is not None:
            self._answers.no_room(exc)
        inbound = arrival.inbound
        if not told:
            reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
            where = exc.state_dir if exc is not None else self._journal.path.parent
            text = (f"the agent's state disk is full (state_dir {where}): the job was not "
                    "accepted; retry later, with the same id to be answered only once (the "
                    "broker keeps this delivery and the agent runs it when there is room)")
            self._metrics.record_error(None, Code.UNAVAILABLE.value)
            # Directly: the outbox is on the full disk. `held` says an answer follows.
            self._send_now(reply.topic, encode_error(self._read(arrival).meta.id,
                                                     Code.UNAVAILABLE, text, held=True),
                           reply.correlation_data, ())
        size = len(inbound.payload)
        if self._held_bytes + size > self._cfg.max_queued_bytes:
            log.warning("job not held in memory (%d bytes held): the broker delivers it "
                        "again after the next reconnect", self._held_bytes)
            return
        self._held.append(arrival)
        self._held_bytes += size

    def _disk_status(self) -> None:
        """After an intake round: clear the alarm once nothing waits for room; figures."""
        self._metrics.disk_backlog(len(self._held), self._answers.waiting_for_room())
        if not self._held and not self._answers.blocked and self._answers.went_through:
            self._answers.clear_alarm()

    def _admit(self, batch: list[Arrival], *, may_inline: bool) -> Job | None:
        """Journal arriving jobs, together with the answers waiting for a commit (one
        transaction), then acknowledge them. Returns the one new job when the intake should
        run it itself (_may_run_inline); the others go to the work queue."""
        queued, queued_bytes = self._ledger.taken()
        room = self._cfg.queue_size - queued
        room_bytes = self._cfg.max_queued_bytes - queued_bytes
        accepted: list[tuple[str, Inbound, Header]] = []
        for arrival in batch:
            inbound = arrival.inbound
            if inbound.oversize:  # never journaled: its payload was dropped unread
                self._refuse_oversize(inbound)
                continue
            if len(accepted) >= room or len(inbound.payload) > room_bytes:
                self._refuse_journaled(arrival)
                continue
            room_bytes -= len(inbound.payload)
            header = self._read(arrival)
            accepted.append((job_key(inbound, self._results_topic, header.meta.id), inbound,
                             header))
        answers = self._answers.take()
        try:
            decisions, seqs = self._journal.commit([stored(i, k) for k, i, _ in accepted],
                                                   [d.completion() for d in answers])
        except Exception:
            self._answers.record(answers)  # on their own, so the failure is the batch's
            raise
        self._answers.went_through = True
        self._answers.answered(answers, seqs)
        fresh: list[Job] = []
        new_bytes = 0
        for (key, inbound, header), decision in zip(accepted, decisions, strict=True):
            if decision.kind == "new":
                new_bytes += len(inbound.payload)
                self._ledger.first_seen(key, inbound.correlation_data)
                fresh.append(self._job(key, inbound, header))
            elif decision.kind == "conflict":
                self._refuse_reused_key(inbound, header.meta)
            elif decision.kind == "duplicate_done":
                self.duplicates += 1
                self._answers.replay(key, inbound.correlation_data)
            else:  # duplicate_pending: the answer is on the way to the first correlation
                self.duplicates += 1
                # Finished between the journal's look and ours: its answer is stored now.
                if not self._ledger.repeat(key, inbound.correlation_data):
                    self._answers.replay(key, inbound.correlation_data)
        self._ledger.count_in(len(fresh), new_bytes)
        for _, inbound, _ in accepted:
            self._ack(inbound.mid, inbound.qos)
        inline = None
        if may_inline and len(fresh) == 1 and self._may_run_inline(fresh[0]):
            inline = fresh.pop()
        for job in fresh:
            self._work_q.put(job)
        return inline

    def _read(self, arrival: Arrival) -> Header:
        if arrival.header is None:
            arrival.header = read_header(arrival.inbound, self._cfg.max_message_bytes)
        return arrival.header

    def _job_id(self, arrival: Arrival) -> str | None:
        """For a refusal: the id read already, else a peek at it (no full decode)."""
        if arrival.header is not None:
            return arrival.header.meta.id
        return peek_job_id(arrival.inbound.payload, arrival.inbound.user_properties)

    def _job(self, key: str, inbound: Inbound, header: Header) -> Job:
        meta = header.meta
        priority = meta.priority if meta.priority is not None else self._cfg.default_priority
        return Job(key, inbound, route_reply(inbound, self._results_topic, self._reply_prefixes),
                   meta, header.request, header.problem, priority,
                   deadline_of(inbound, meta.timeout_ms, meta.sent_at_ms))

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
        rate = self._workers.run_s_per_byte(req.model_name)
        if rate is None or rate * len(job.inbound.payload) > INLINE_MAX_S:
            return False
        if not self._queue.empty() or not self._work_q.empty():
            return False
        if self._ledger.anyone_busy():
            return False
        return self._outbox.has_room() and self._answers.flow.is_set()

    # --- refusals ------------------------------------------------------------------------

    def _refuse_now(self, arrival: Arrival, why: str,
                    code: Code = Code.RESOURCE_EXHAUSTED) -> None:
        inbound = arrival.inbound
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        self.rejected += 1
        self._metrics.record_error(None, code.value)
        text = f"{why}; retry later" if code is Code.RESOURCE_EXHAUSTED else why
        self._send_now(reply.topic, encode_error(self._job_id(arrival), code, text),
                       reply.correlation_data, ())
        self._ack(inbound.mid, inbound.qos)

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
        self._answers.send_out(reply.topic, encode_error(meta.id, Code.INVALID_ARGUMENT, text),
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

    def _refuse_journaled(self, arrival: Arrival) -> None:
        """Queue full: the refusal goes through the outbox, and the job is not kept."""
        inbound = arrival.inbound
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        payload = encode_error(
            self._job_id(arrival),
            Code.RESOURCE_EXHAUSTED,
            f"job queue is full ({self._cfg.queue_size} jobs or "
            f"{self._cfg.max_queued_bytes} bytes waiting); retry later",
        )
        self.rejected += 1
        self._metrics.record_error(None, Code.RESOURCE_EXHAUSTED.value)
        self._answers.send_out(reply.topic, payload, reply.correlation_data, ())
        self._ack(inbound.mid, inbound.qos)
