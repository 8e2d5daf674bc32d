"""The journal's SQLite database (WAL): its schema, and `Journal`, which admits jobs,
records their answers with the outbox rows that carry them, and hands the outbox its rows.
agent/journal/__init__.py says what the journal guarantees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from edgeinfer.agent.journal.disk_full import DiskFull, disk_full_cause
from edgeinfer.agent.journal.records import (
    Admission,
    Completion,
    OutMessage,
    StoredAnswer,
    StoredJob,
    props_from_json,
)
from edgeinfer.agent.journal.spool import SPOOL_MIN_BYTES, Spool
from edgeinfer.agent.runslots import RunSlots, read_running, run_tag

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL,               -- 'queued' | 'done'
    topic TEXT NOT NULL,
    payload BLOB,                      -- dropped once done; NULL when spooled
    response_topic TEXT,
    correlation BLOB,
    user_props TEXT NOT NULL,
    expiry_s INTEGER,
    received_wall REAL NOT NULL,
    result_topic TEXT,
    result BLOB,
    result_props TEXT,
    executions INTEGER NOT NULL DEFAULT 0,
    done_wall REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, done_wall);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    correlation BLOB,
    user_props TEXT NOT NULL,
    created_wall REAL NOT NULL
);
-- Runs cut short by the agent stopping, per job: `key` is the run tag of agent/runslots.py
-- (older state dirs: the job key). Written only when the agent starts again.
CREATE TABLE IF NOT EXISTS attempts (key TEXT PRIMARY KEY, n INTEGER NOT NULL);
"""


RUNNING_FILE = "running"  # <database file name>.running: agent/runslots.py


class Journal:
    """Thread-safe. Writes go through one connection under one lock, each method one short
    transaction (`commit`: a whole group, admissions and answers together); the outbox
    reads on a second connection; run marks go to memory-mapped slots (agent/runslots.py),
    not to the database."""

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a killed process (the OS still holds the pages); FULL also survives
        # power loss, at an fsync per commit.
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        if "payload_file" not in columns:  # state dirs from before the spool
            self._db.execute("ALTER TABLE jobs ADD COLUMN payload_file TEXT")
        if "request_digest" not in columns:  # from before: their rows' digests are NULL
            self._db.execute("ALTER TABLE jobs ADD COLUMN request_digest BLOB")
        self._spool = Spool(path, synchronous.upper() == "FULL")
        # The outbox publisher reads on its own connection: in WAL mode a reader sees the
        # last commit without waiting for the writers' lock (the workers' hot path).
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._running_path = path.with_name(path.name + "." + RUNNING_FILE)
        self._count_interrupted_runs()
        self._slots = RunSlots(self._running_path)
        self._remove_orphan_spool_files()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write: an error that says the disk is full comes out as DiskFull."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            cause = disk_full_cause(exc, self.path.parent)
            if cause is None:
                raise
            raise DiskFull(self.path.parent, cause) from exc

    def _rollback(self) -> None:
        """Under _lock, after a failed statement: end the transaction if SQLite has not
        already (it rolls back by itself after some errors, SQLITE_FULL among them, and a
        second ROLLBACK would raise an error of its own over the one that matters)."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _remove_orphan_spool_files(self) -> None:
        """Spool files written for jobs whose admission never committed (a crash between
        the two), or whose job is done but the unlink did not happen."""
        with self._lock:
            wanted = {r[0] for r in self._db.execute(
                "SELECT payload_file FROM jobs WHERE state = 'queued' AND payload_file IS NOT NULL")}
        self._spool.remove_all_but(wanted)

    def _count_interrupted_runs(self) -> None:
        """Charge a run to each unanswered job that was running when the agent stopped, and
        forget the counts of jobs that are answered (before the slots are cleared)."""
        running = read_running(self._running_path)
        try:
            with self._writing():
                self._count_runs(running)
        except DiskFull as exc:
            # Counting guards against a job that crashes the agent every time; starting on
            # a full disk must not fail for it: these runs go uncounted.
            log.error("interrupted runs not counted: %s", exc)

    def _count_runs(self, running: Sequence[bytes]) -> None:
        with self._lock:
            queued = self._db.execute(
                "SELECT key, received_wall FROM jobs WHERE state = 'queued'").fetchall()
            live = {run_tag(k, wall).decode() for k, wall in queued} | {k for k, _ in queued}
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for tag in running:
                    if tag.decode() in live:
                        self._db.execute(
                            "INSERT INTO attempts (key, n) VALUES (?, 1)"
                            " ON CONFLICT(key) DO UPDATE SET n = n + 1", (tag.decode(),))
                stale = [k for (k,) in self._db.execute("SELECT key FROM attempts") if k not in live]
                self._db.executemany("DELETE FROM attempts WHERE key = ?", [(k,) for k in stale])
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()
            self._slots.close()

    # --- jobs ----------------------------------------------------------------------------

    def admit(self, jobs: Sequence[StoredJob]) -> list[Admission]:
        """Record new jobs (one transaction for the batch); say which were seen before.

        A job whose key is known is a "conflict" when both it and the known job have a
        digest and the two differ (a row from before digests were kept matches anything).
        """
        return self.commit(jobs, ())[0]

    def complete(
        self,
        key: str,
        executed: bool,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        user_props: Sequence[tuple[str, str]],
    ) -> int:
        """Mark a job done with its answer and queue the answer in the outbox; returns its seq."""
        answer = Completion(key, executed, topic, payload, correlation, tuple(user_props))
        return self.commit((), (answer,))[1][0]

    def commit(self, jobs: Sequence[StoredJob], answers: Sequence[Completion]
               ) -> tuple[list[Admission], list[int]]:
        """A group commit: admit `jobs` and record `answers` (each job marked done with its
        answer and the answer's outbox row) in ONE transaction; returns what `admit` decided
        for each job and each answer's outbox seq. All or nothing: on an error nothing of
        the group is recorded and the caller may retry each part alone. Raises DiskFull
        when the disk had no room for the group (its spool files or its rows).

        Answers are written before admissions, so a repeat of a job answered in the same
        group is seen as done (answered from the stored answer).
        """
        out: list[Admission] = []
        seqs: list[int] = []
        # Large payloads go to spool files first, outside the lock; a file whose row does
        # not commit is removed (here, or at the next start after a crash).
        spooled: dict[int, str] = {}
        unused: list[str] = []
        now = time.time()
        answer_props = [json.dumps(list(a.user_props)) for a in answers]
        try:
            with self._writing():
                for i, job in enumerate(jobs):
                    if len(job.payload) >= SPOOL_MIN_BYTES:
                        spooled[i] = self._spool.write(job.payload)
                if spooled:
                    self._spool.sync()
                self._commit_rows(jobs, answers, answer_props, spooled, unused, out, seqs, now)
        except BaseException:
            self._spool.unlink(list(spooled.values()))
            raise
        self._spool.unlink(unused)
        return out, seqs

    def _commit_rows(self, jobs: Sequence[StoredJob], answers: Sequence[Completion],
                     answer_props: Sequence[str], spooled: dict[int, str], unused: list[str],
                     out: list[Admission], seqs: list[int], now: float) -> None:
        """`commit`'s transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for answer, props in zip(answers, answer_props, strict=True):
                    seqs.append(self._insert_out(answer.topic, answer.payload, 1,
                                                 answer.correlation, props, now))
                    # payload_file stays on the done row (unused): RETURNING gives the
                    # value after the update; the file is removed once the commit is made.
                    spool = self._db.execute(
                        "UPDATE jobs SET state = 'done', payload = NULL,"
                        " result_topic = ?, result = ?, result_props = ?, done_wall = ?,"
                        " executions = executions + ? WHERE key = ? RETURNING payload_file",
                        (answer.topic, answer.payload, props, now,
                         1 if answer.executed else 0, answer.key),
                    ).fetchone()
                    if spool and spool[0]:
                        unused.append(spool[0])
                for i, job in enumerate(jobs):
                    out.append(self._admit_one(job, spooled.get(i), unused))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _admit_one(self, job: StoredJob, spool: str | None, unused: list[str]) -> Admission:
        """Under _lock, in a transaction: one job of `commit`."""
        # Insert first and look only when the key was there: one statement for a new job,
        # the common case.
        cur = self._db.execute(
            "INSERT INTO jobs (key, state, topic, payload, response_topic,"
            " correlation, user_props, expiry_s, received_wall, payload_file,"
            " request_digest)"
            " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(key) DO NOTHING",
            (job.key, job.topic, None if spool else job.payload, job.response_topic,
             job.correlation, json.dumps(job.user_props), job.expiry_s,
             job.received_wall, spool, job.digest),
        )
        if cur.rowcount == 1:
            return Admission("new", job)
        if spool:
            unused.append(spool)
        state, digest = self._db.execute(
            "SELECT state, request_digest FROM jobs WHERE key = ?", (job.key,)
        ).fetchone()
        if digest is not None and job.digest is not None and digest != job.digest:
            return Admission("conflict", job)
        return Admission("duplicate_done" if state == "done" else "duplicate_pending", job)

    def stored_answer(self, key: str) -> StoredAnswer | None:
        """A done job's answer as it was first sent (for a duplicate); None if none is stored."""
        with self._lock:
            row = self._db.execute(
                "SELECT result_topic, result, result_props FROM jobs WHERE key = ? AND state = 'done'",
                (key,),
            ).fetchone()
        if row is None or row[1] is None:
            return None
        return StoredAnswer(row[0], bytes(row[1]), props_from_json(row[2]))

    def pending(self) -> list[StoredJob]:
        """Jobs accepted but not answered: what a restart must run."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, topic, payload, response_topic, correlation, user_props, expiry_s,"
                " received_wall, payload_file FROM jobs WHERE state = 'queued' ORDER BY rowid"
            ).fetchall()
            runs = dict(self._db.execute("SELECT key, n FROM attempts").fetchall())
        return [
            StoredJob(r[0], r[1], self._payload(r[2], r[8]), r[3],
                      None if r[4] is None else bytes(r[4]), props_from_json(r[5]), r[6], r[7],
                      runs.get(run_tag(r[0], r[7]).decode(), 0) + runs.get(r[0], 0))
            for r in rows
        ]

    def _payload(self, blob: bytes | None, spool: str | None) -> bytes:
        if spool is None:
            return bytes(blob or b"")
        try:
            return self._spool.read(spool)
        except OSError as exc:
            # Answered as a malformed job (an empty payload) rather than kept forever.
            log.error("journaled job's payload file %s is gone: %s", spool, exc)
            return b""

    def running(self, jobs: Sequence[tuple[str, float]]) -> None:
        """Jobs (key, journaled admission time) this thread is about to run: counted as an
        attempt if the agent stops before `done_running`. No disk write (runslots.py)."""
        rest = self._slots.enter([run_tag(key, wall) for key, wall in jobs])
        if rest:  # more than a slot holds: counted at once, in the table
            try:
                with self._writing(), self._lock:
                    self._db.executemany(
                        "INSERT INTO attempts (key, n) VALUES (?, 1)"
                        " ON CONFLICT(key) DO UPDATE SET n = n + 1", [(t.decode(),) for t in rest])
            except DiskFull as exc:  # a guard against crash loops; the run goes on
                log.warning("%d run(s) not counted: %s", len(rest), exc)

    def done_running(self) -> None:
        self._slots.leave()

    def prune(self, older_than_wall: float) -> int:
        """Forget answers older than the dedup window."""
        with self._writing(), self._lock:
            cur = self._db.execute(
                "DELETE FROM jobs WHERE state = 'done' AND done_wall < ?", (older_than_wall,)
            )
            return cur.rowcount

    def queued_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM jobs WHERE state = 'queued'").fetchone()[0])

    # --- outbox --------------------------------------------------------------------------

    def enqueue(self, topic: str, payload: bytes, qos: int = 1,
                correlation: bytes | None = None,
                user_props: Sequence[tuple[str, str]] = ()) -> int:
        """Queue a message that is no job's final answer (an event, a refusal, a partial, an
        answer served again). Raises DiskFull."""
        with self._writing(), self._lock:
            return self._insert_out(topic, payload, qos, correlation,
                                    json.dumps(list(user_props)), time.time())

    def _insert_out(self, topic: str, payload: bytes, qos: int, correlation: bytes | None,
                    props: str, now: float) -> int:
        cur = self._db.execute(
            "INSERT INTO outbox (topic, payload, qos, correlation, user_props, created_wall)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (topic, payload, qos, correlation, props, now),
        )
        return int(cur.lastrowid or 0)

    def outbox_after(self, seq: int, limit: int) -> list[OutMessage]:
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT seq, topic, payload, qos, correlation, user_props FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [
            OutMessage(r[0], r[1], bytes(r[2]), r[3], None if r[4] is None else bytes(r[4]),
                       props_from_json(r[5]))
            for r in rows
        ]

    def outbox_start(self) -> int:
        """The seq before the first row to send: the oldest waiting row's, else the last
        seq handed out (AUTOINCREMENT: rows that follow get the seqs after it, in order)."""
        with self._read_lock:
            (first,) = self._reader.execute("SELECT min(seq) FROM outbox").fetchone()
            if first is not None:
                return int(first) - 1
            row = self._reader.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return int(row[0]) if row else 0

    def acked(self, seqs: Sequence[int]) -> None:
        """Forget messages the broker acknowledged (one statement: autocommit). Raises
        DiskFull (a DELETE writes to the WAL too)."""
        if not seqs:
            return
        marks = ",".join("?" * len(seqs))
        with self._writing(), self._lock:
            self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", list(seqs))  # noqa: S608 - placeholders only

    def outbox_stats(self) -> tuple[int, int]:
        """(messages, bytes) waiting for the broker."""
        with self._read_lock:
            n, size = self._reader.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
            ).fetchone()
        return int(n), int(size)
