"""Jobs: intake from the network thread, a durable journal, worker threads, one answer each.

`Scheduler` wires the rooms of the job path and is what the agent (agent/daemon.py) and
the watchdog (agent/lifecycle.py) talk to; each room has one job:

    agent/intake.py    admission: the intake queue, journaling of arrivals, acknowledges,
                       refusals, the jobs held while the state disk is full, recovery
    agent/headers.py   the one read of a job's header
    agent/jobs.py      the typed Job (meta, request, reply, deadline), keys, the work queue
    agent/inflight.py  the ledger: jobs unanswered, repeats, cancel switches, who runs
    agent/workers.py   worker loop: prepare, run (alone, batched, through a pipeline), answer
    agent/answers.py   the group commit of answers; replays, refusals, partial answers out
    agent/queries.py   OIP's health and metadata queries, answered by the intake unjournaled
    agent/shadow.py    shadow versions' copies of answered jobs, on a low-priority lane

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

Since issue 13 the other paths parse once too: a job refused or failing before it runs
is answered with the id the intake read (no second peek), a job held while the disk is
full or admitted one by one after a failed batch is not read again, and a job recovered
from the journal is read once when it is queued. A header over 64 KiB is still peeked at
by the intake and decoded by its worker (agent/headers.py says why).

Group commits never hold a job back waiting for company: whoever commits takes what is
there now. Durability is unchanged: a job is acknowledged only after the transaction that
admits it has committed, an answer is handed to the outbox only after the transaction that
records it has, and the outbox forgets a row only on its PUBACK (docs/protocol.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from edgeinfer.agent.answers import Answers, SendNow
from edgeinfer.agent.config import JobsConfig
from edgeinfer.agent.diskalarm import DiskAlarm
from edgeinfer.agent.inflight import Ledger
from edgeinfer.agent.intake import Ack, Intake
from edgeinfer.agent.jobs import WorkQueue
from edgeinfer.agent.journal import Journal
from edgeinfer.agent.local_replies import LocalReplies
from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.outbox import OutboxPublisher
from edgeinfer.agent.queries import Queries
from edgeinfer.agent.served import ServedModels
from edgeinfer.agent.shadow import ShadowLane
from edgeinfer.agent.workers import RunObserver, Unobserved, Workers
from edgeinfer.contract.documents import ModelEntry

__all__ = ["Ack", "RunObserver", "Scheduler", "SendNow"]


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
        observer: RunObserver | None = None,
        statuses: Callable[[], Sequence[ModelEntry]] = list,
        local: LocalReplies | None = None,
    ) -> None:
        """`observer` is told every run's outcome (agent/failover.py); `alarm` raised and
        cleared by the journal's commits (by default one that tells nobody); `statuses`:
        the versions `reported` lists, for readiness queries (by default none); `local`: the
        reply topics of local requests (agent/local_replies.py), answered without a broker."""
        self._cfg = cfg
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ledger = Ledger()
        self._work_q = WorkQueue()
        self._answers = Answers(
            journal, outbox, send_now, self._ledger,
            alarm if alarm is not None else DiskAlarm(
                journal.path.parent, metrics, lambda kind, **fields: None),
            self._wake_intake, local)
        # Shadow versions' copies of jobs, on a low-priority thread of their own.
        self._shadows = ShadowLane(registry, metrics, cfg.shadow_backlog,
                                   cfg.shadow_backlog_bytes)
        self._workers = Workers(registry, metrics, journal, outbox, self._answers,
                                self._ledger, self._work_q, results_topic, cfg,
                                observer if observer is not None else Unobserved(),
                                self._stopping, self._shadows)
        self.queries = Queries(registry, statuses, self.taking_jobs,
                               send_now, ack, results_topic, reply_prefixes)
        self._intake = Intake(journal, outbox, self._answers, self._ledger, self._workers,
                              self._work_q, metrics, ack, send_now, results_topic,
                              reply_prefixes, cfg, self.queries)

    def _wake_intake(self) -> None:
        # Answers blocked by a full disk: the intake, maybe waiting for a job, retries them.
        self._intake.wake()

    @property
    def executed(self) -> int:
        """Inference runs in this process."""
        return self._workers.executed

    @property
    def duplicates(self) -> int:
        """Jobs answered from a stored answer."""
        return self._intake.duplicates

    @property
    def rejected(self) -> int:
        """Jobs refused before they were journaled (a full intake or queue, a payload
        over the limit, a journal that would not take them)."""
        return self._intake.rejected

    def depth(self) -> int:
        return self._ledger.depth()

    # --- health and drain (agent/lifecycle.py) -------------------------------------------

    def longest_job(self) -> tuple[str, float] | None:
        """The worker whose running job started first, and for how many seconds it has run."""
        return self._ledger.longest()

    def dead_threads(self) -> list[str]:
        return [t.name for t in self._threads if not t.is_alive()]

    def taking_jobs(self) -> bool:
        """False once a drain began (jobs are then left with the broker)."""
        return not self._intake.draining.is_set()

    def drain(self, timeout: float) -> int:
        """Take no more jobs; wait up to `timeout` s for the taken ones to be answered.

        Returns how many are still unanswered: they stay in the journal and run after the
        next start, as do jobs that arrive from now on (the broker keeps them unacknowledged).
        """
        self._intake.draining.set()
        with self._intake.admitting:  # a batch being admitted now is counted before we look
            pass
        deadline = time.monotonic() + timeout
        while self.depth() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.depth()

    # --- lifecycle -----------------------------------------------------------------------

    def recover(self) -> int:
        """Queue what the journal holds unanswered from before a restart."""
        return self._intake.recover()

    def start(self) -> None:
        intake = threading.Thread(target=self._intake.loop, name="job-intake", daemon=True)
        intake.start()
        self._threads.append(intake)
        for i in range(self._cfg.workers):
            t = threading.Thread(target=self._workers.loop, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._shadows.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._shadows.stop()
        self._intake.stop()
        for _ in range(self._cfg.workers):
            self._work_q.put_stop()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- intake: the network thread ------------------------------------------------------

    def intake_settled(self) -> bool:
        """Whether the intake is done with every job handed over so far."""
        return self._intake.settled()

    def submit(self, inbound: Inbound) -> None:
        """Network thread: hand over, never block."""
        self._intake.submit(inbound)
