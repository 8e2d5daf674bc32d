"""The durable job journal and result outbox: one SQLite database (WAL) under `state_dir`.

A job is written here before the broker gets its PUBACK, and its answer is written in
the same transaction that marks it done, together with the outbox row that carries the
answer to the broker. So a crash at any point loses nothing: a job without an answer is
run again after a restart (no answer had been recorded, so it never ran to completion
before), and an answer the broker has not acknowledged is sent again. A job seen again
(QoS 1 redelivery, a client's retry) is answered from its stored answer, not run again;
one whose request differs from the first's (`request_digest`) is told apart, not answered
with the other request's answer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.agent.runslots import RunSlots, read_running, run_tag
from edgeinfer.agent.store import fsync_dir

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
# Payloads this large are written to a file of their own (<database file name>.spool/)
# instead of into the database: a 600 KB image as a blob is written to the WAL, copied
# again by every checkpoint, and its 150 overflow pages freed page by page once the job is
# done; as a file it is one write and one unlink.
SPOOL_DIR = "spool"
SPOOL_MIN_BYTES = 64 * 1024


# SQLite's I/O errors that mean a full disk when the disk has no room left (SQLite reports
# ENOSPC as SQLITE_FULL on most writes, but as one of these where it grows or maps a file).
_IOERR_WRITES = frozenset({sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_SHMSIZE,
                           sqlite3.SQLITE_IOERR_TRUNCATE, sqlite3.SQLITE_IOERR_FSYNC})


class DiskFull(Exception):
    """A write to the state disk failed for lack of space (the journal's database, its
    WAL, or a spool file). Nothing of the failed write is recorded: the caller keeps what
    it meant to write and tries again later. `cause` is the error's name (SQLITE_FULL,
    ENOSPC, ...), never SQLite's or the OS's text."""

    def __init__(self, state_dir: Path, cause: str) -> None:
        super().__init__(f"the state disk is full (state_dir {state_dir}; {cause})")
        self.state_dir = state_dir
        self.cause = cause


def disk_full_cause(exc: BaseException, where: Path) -> str | None:
    """The name of `exc` when it says the disk under `where` is full, else None. By error
    code, never by message: SQLITE_FULL, ENOSPC or EDQUOT, or one of SQLite's write
    I/O errors while the disk has no room left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errno.errorcode[exc.errno]
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)  # absent on errors sqlite3 makes itself
    if code is None:
        return None
    name = str(getattr(exc, "sqlite_errorname", code))
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return name
    if code in _IOERR_WRITES:
        with contextlib.suppress(OSError):
            if os.statvfs(where).f_bavail == 0:
                return name
    return None


@dataclass(frozen=True)
class StoredJob:
    key: str
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    user_props: tuple[tuple[str, str], ...]
    expiry_s: int | None
    received_wall: float
    attempts: int = 0
    # Identity of the request (agent/scheduler.py's request_digest), compared when its key
    # comes again; None: a job whose key cannot come again, never compared.
    digest: bytes | None = None


@dataclass(frozen=True)
class OutMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int
    correlation: bytes | None
    user_props: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Admission:
    """What `admit` decided for one job."""

    kind: str  # "new" | "duplicate_done" | "duplicate_pending" | "conflict"
    job: StoredJob


@dataclass(frozen=True)
class Completion:
    """A job's final answer, to be recorded by `Journal.commit`."""

    key: str
    executed: bool  # the runtime ran it (counted in the row's executions)
    topic: str
    payload: bytes
    correlation: bytes | None
    user_props: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StoredAnswer:
    topic: str
    payload: bytes
    user_props: tuple[tuple[str, str], ...]


def _props(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in json.loads(text))


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
        self._full = synchronous.upper() == "FULL"
        self._spool = path.with_name(path.name + "." + SPOOL_DIR)
        self._spool.mkdir(exist_ok=True)
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
        for entry in self._spool.iterdir():
            if entry.name not in wanted:
                entry.unlink(missing_ok=True)

    def _spool_write(self, payload: bytes) -> str:
        name = uuid.uuid4().hex
        fd = os.open(self._spool / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            if self._full:
                os.fsync(fd)
        except BaseException:
            # A part written (the disk filled up) would hold its space until the next start.
            os.close(fd)
            self._spool_unlink([name])
            raise
        os.close(fd)
        return name

    def _spool_unlink(self, names: Sequence[str]) -> None:
        for name in names:
            # One left behind is removed at the next start.
            with contextlib.suppress(OSError):
                os.unlink(self._spool / name)

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
                        spooled[i] = self._spool_write(job.payload)
                if spooled and self._full:
                    fsync_dir(self._spool)
                self._commit_rows(jobs, answers, answer_props, spooled, unused, out, seqs, now)
        except BaseException:
            self._spool_unlink(list(spooled.values()))
            raise
        self._spool_unlink(unused)
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
        return StoredAnswer(row[0], bytes(row[1]), _props(row[2]))

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
                      None if r[4] is None else bytes(r[4]), _props(r[5]), r[6], r[7],
                      runs.get(run_tag(r[0], r[7]).decode(), 0) + runs.get(r[0], 0))
            for r in rows
        ]

    def _payload(self, blob: bytes | None, spool: str | None) -> bytes:
        if spool is None:
            return bytes(blob or b"")
        try:
            return (self._spool / spool).read_bytes()
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
                       _props(r[5]))
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
