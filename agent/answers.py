"""Answers: the group commit of final answers, and every other message a job sends.

A job's final answer is recorded (its `done` mark and its outbox row) in a group commit
and then handed to the outbox by the thread that committed it. Group commits never hold
an answer back waiting for company: the first thread to bring one while no commit is
under way commits every answer there is, and again while more came meanwhile; one that
brings it during a commit leaves it for that committer (or for the intake's next
admission, which takes the waiting answers into its own transaction) and goes on.

When the state disk is full, the answers wait here, in order, `blocked`; `flow` is then
clear and workers take no new job; the intake tries them again (with backoff) until they
are recorded: no answer is dropped. Messages that are no job's final answer (refusals,
replays, partial answers) go through the outbox too, or directly while the disk is full.

An answer to a local request (agent/local_replies.py: the HTTP endpoint's) is handed to
the request as soon as it is recorded, not when the outbox gets to it: its outbox row is
still written and handed over, so the outbox's order and counts stay as they are, and the
agent's publish swallows it (agent/daemon.py). Other messages to a local request never
touch the journal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from edgeinfer.agent.diskalarm import DiskAlarm
from edgeinfer.agent.inflight import Ledger
from edgeinfer.agent.jobs import Answer
from edgeinfer.agent.journal import Completion, DiskFull, Journal, OutMessage
from edgeinfer.agent.local_replies import LocalReplies
from edgeinfer.agent.outbox import OutboxPublisher
from edgeinfer.agent.protocol import Encoded, mark_replayed

log = logging.getLogger(__name__)


class SendNow(Protocol):
    """Direct publish (QoS 1, not kept on disk) for answers that cannot go through the
    journal: an intake that is full, a state disk that is full."""

    def __call__(self, topic: str, payload: bytes, correlation: bytes | None,
                 user_properties: Sequence[tuple[str, str]], /) -> None: ...


@dataclass(frozen=True)
class Done:
    """A job's answer waiting for its group commit."""

    key: str
    size: int  # the job's payload, for the queued-bytes count
    answer: Answer

    def completion(self) -> Completion:
        a = self.answer
        return Completion(self.key, a.executed, a.reply.topic, a.payload,
                          a.reply.correlation_data, a.user_properties)


class Answers:
    def __init__(self, journal: Journal, outbox: OutboxPublisher, send_now: SendNow,
                 ledger: Ledger, alarm: DiskAlarm, wake_intake: Callable[[], None],
                 local: LocalReplies | None = None) -> None:
        self._journal = journal
        self._local = local
        self._outbox = outbox
        self._send_now = send_now
        self._ledger = ledger
        self._alarm = alarm
        self._wake_intake = wake_intake  # the intake may be waiting for a job that never comes
        # Whoever takes answers from `_waiting` commits them: the thread that is
        # `_committing` (it goes on while some are left) or the intake, with its next batch.
        self._waiting: list[Done] = []
        self._lock = threading.Lock()
        self._committing = False
        # Answers that found the disk full wait in `_waiting` (in front) with this set, and
        # workers take no new job meanwhile; the intake commits them when there is room.
        self._blocked = False
        self.flow = threading.Event()  # set: answers can be committed
        self.flow.set()
        self.went_through = True  # the last journal commit did (for the alarm)

    @property
    def blocked(self) -> bool:
        return self._blocked

    def waiting_for_room(self) -> int:
        with self._lock:
            return len(self._waiting) if self._blocked else 0

    def no_room(self, exc: DiskFull) -> None:
        self.went_through = False
        self._alarm.full("journal", exc)

    def clear_alarm(self) -> None:
        """Nothing waits for room on the disk any more."""
        self._alarm.clear("journal")

    # --- the group commit ----------------------------------------------------------------

    def finish(self, key: str, size: int, answer: Answer) -> None:
        """Record the answer of job `key` (payload of `size` bytes) in a group commit;
        answer waiting repeats. Never waits for company (the module's docstring)."""
        with self._lock:
            self._waiting.append(Done(key, size, answer))
            if self._committing or self._blocked:  # blocked: the intake retries
                return
            self._committing = True
        self._commit_loop()

    def _commit_loop(self) -> None:
        """The committer's loop (its caller set `_committing`): commit what waits until
        nothing does, or until the disk has no room for it."""
        try:
            while True:
                with self._lock:
                    group, self._waiting = self._waiting, []
                    if not group:
                        self._committing = False
                        return
                if not self.record(group):
                    with self._lock:
                        self._committing = False
                    return
        except BaseException:
            with self._lock:
                self._committing = False
            raise

    def commit_waiting(self) -> None:
        """The intake's turn, while answers wait for room on the disk: try them again."""
        with self._lock:
            if not self._blocked or self._committing:
                return
            self._committing = True
        if self._commit_once():
            self._unblock()

    def _commit_once(self) -> bool:
        """Under `_committing`: one try at what waits; True when it was recorded."""
        try:
            with self._lock:
                group, self._waiting = self._waiting, []
            return self.record(group)
        finally:
            with self._lock:
                self._committing = False

    def _unblock(self) -> None:
        """An answer commit went through: if answers were held back by a full disk, let
        them flow, and commit those that came meanwhile (nobody else would: a worker that
        brought one while blocked left it)."""
        with self._lock:
            if not self._blocked:
                return
            self._blocked = False
            self.flow.set()
            if self._committing or not self._waiting:
                return
            self._committing = True
        self._commit_loop()

    def take(self) -> list[Done]:
        """For the intake's admission: the answers there are, unless they wait for room on
        the disk (then `commit_waiting` tries them alone, and the jobs go in without)."""
        with self._lock:
            if self._blocked:
                return []
            group, self._waiting = self._waiting, []
        return group

    def record(self, group: list[Done]) -> bool:
        """Commit a group of answers in one transaction (one by one if that fails) and hand
        them to the outbox. Never raises. When the disk has no room, the group goes back in
        front of the waiting answers, marked blocked, and False is returned: the intake
        tries again (with backoff) until it is recorded; no answer is dropped. Any other
        failure leaves an answer's job in the journal, unanswered, to run again after a
        restart."""
        if not group:
            return True
        try:
            seqs: list[int | None] = list(
                self._journal.commit((), [d.completion() for d in group])[1])
        except DiskFull as exc:
            self._keep_for_room(group, exc)
            return False
        except Exception:
            log.exception("recording %d answer(s) together failed; one by one", len(group))
            seqs = []
            kept: list[Done] = []
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
                self.answered([d for d, _ in recorded], [q for _, q in recorded])
                self._keep_for_room(kept, full)
                return False
        else:
            self.went_through = True
        self.answered(group, seqs)
        return True

    def _keep_for_room(self, group: list[Done], exc: DiskFull) -> None:
        """Answers the disk had no room for: back in front of those waiting, blocked."""
        self.no_room(exc)
        with self._lock:
            self._waiting[:0] = group
            self._blocked = True
            self.flow.clear()
        self._wake_intake()

    def answered(self, group: Sequence[Done], seqs: Sequence[int | None]) -> None:
        """After the commit of `group`: its answers to the outbox, in seq order; repeats
        that waited for them answered; the jobs no longer counted as queued."""
        try:
            msgs = [OutMessage(seq, d.answer.reply.topic, d.answer.payload, 1,
                               d.answer.reply.correlation_data, d.answer.user_properties)
                    for d, seq in zip(group, seqs, strict=True) if seq is not None]
            if self._local is not None:
                for msg in msgs:
                    if self._local.is_local(msg.topic):
                        self._local.deliver(msg.topic, msg.payload, msg.user_props)
            if msgs:
                self._outbox.hand_over_many(msgs)
            for done, seq in zip(group, seqs, strict=True):
                if seq is None:
                    continue
                for correlation in self._ledger.answered(done.key):
                    self.replay(done.key, correlation)
        except Exception:
            # Recorded: the outbox thread sends them from the table.
            log.exception("answers of %d job(s) recorded but not handed over", len(group))
            self._outbox.wake()
        finally:
            self._ledger.count_out(len(group), sum(d.size for d in group))

    # --- messages that are no job's final answer -----------------------------------------

    def replay(self, key: str, correlation: bytes | None) -> None:
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
        self.send_out(answer.topic, marked.payload, correlation, marked.user_properties)

    def send_partial(self, topic: str, payload: bytes, correlation: bytes | None,
                     user_properties: Sequence[tuple[str, str]]) -> None:
        """A streaming job's partial answer (`sequence_end: false`). A local request is
        answered once (KServe v2's infer has no stream): it gets the final answer only."""
        if self._local is not None and self._local.is_local(topic):
            return
        self.send_out(topic, payload, correlation, user_properties)

    def send_out(self, topic: str, payload: bytes, correlation: bytes | None,
                 user_properties: Sequence[tuple[str, str]]) -> None:
        """A message that is no job's final answer, through the outbox; directly when the
        disk is full (it is then lost if the link drops before its PUBACK: a refusal, a
        replay or a partial answer, which the client's retry or the final answer covers)."""
        if self._local is not None and self._local.is_local(topic):
            self._local.deliver(topic, payload, user_properties)
            return
        try:
            self._journal.enqueue(topic, payload, 1, correlation, user_properties)
        except DiskFull as exc:
            # No alarm from here: only the journal's commits raise and clear it.
            log.warning("sent without the outbox: %s", exc)
            self._send_now(topic, payload, correlation, user_properties)
            return
        self._outbox.added(len(payload))
