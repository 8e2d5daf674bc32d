"""The durable job journal and result outbox: one SQLite database (WAL) under `state_dir`.

A job is written here before the broker gets its PUBACK, and its answer is written in
the same transaction that marks it done, together with the outbox row that carries the
answer to the broker. So a crash at any point loses nothing: a job without an answer is
run again after a restart (no answer had been recorded, so it never ran to completion
before), and an answer the broker has not acknowledged is sent again. A job seen again
(QoS 1 redelivery, a client's retry) is answered from its stored answer, not run again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL,               -- 'queued' | 'done'
    topic TEXT NOT NULL,
    payload BLOB,                      -- dropped once done
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
-- Runs started, apart from the job's row: counting one must not rewrite its payload.
CREATE TABLE IF NOT EXISTS attempts (key TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


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

    kind: str  # "new" | "duplicate_done" | "duplicate_pending"
    job: StoredJob


def _props(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in json.loads(text))


class Journal:
    """Thread-safe: one connection, one lock; every method is one short transaction."""

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
        # The outbox publisher reads on its own connection: in WAL mode a reader sees the
        # last commit without waiting for the writers' lock (the workers' hot path).
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()

    # --- jobs ----------------------------------------------------------------------------

    def admit(self, jobs: Sequence[StoredJob]) -> list[Admission]:
        """Record new jobs (one transaction for the batch); say which were seen before."""
        out: list[Admission] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for job in jobs:
                    row = self._db.execute(
                        "SELECT state FROM jobs WHERE key = ?", (job.key,)
                    ).fetchone()
                    if row is not None:
                        kind = "duplicate_done" if row[0] == "done" else "duplicate_pending"
                        out.append(Admission(kind, job))
                        continue
                    self._db.execute(
                        "INSERT INTO jobs (key, state, topic, payload, response_topic, correlation,"
                        " user_props, expiry_s, received_wall) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                        (job.key, job.topic, job.payload, job.response_topic, job.correlation,
                         json.dumps(job.user_props), job.expiry_s, job.received_wall),
                    )
                    out.append(Admission("new", job))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

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
        now = time.time()
        props = json.dumps(list(user_props))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._insert_out(topic, payload, 1, correlation, props, now)
                self._db.execute(
                    "UPDATE jobs SET state = 'done', payload = NULL,"
                    " result_topic = ?, result = ?, result_props = ?, done_wall = ?,"
                    " executions = executions + ? WHERE key = ?",
                    (topic, payload, props, now, 1 if executed else 0, key),
                )
                self._db.execute("DELETE FROM attempts WHERE key = ?", (key,))
                if executed:
                    self._bump("executions")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return seq

    def resend_stored(self, key: str, correlation: bytes | None) -> int | None:
        """Queue a done job's stored answer again (for a duplicate); None if none is stored."""
        with self._lock:
            row = self._db.execute(
                "SELECT result_topic, result, result_props FROM jobs WHERE key = ? AND state = 'done'",
                (key,),
            ).fetchone()
            if row is None or row[1] is None:
                return None
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._insert_out(row[0], row[1], 1, correlation, row[2], time.time())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return seq

    def pending(self) -> list[StoredJob]:
        """Jobs accepted but not answered: what a restart must run."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, topic, payload, response_topic, correlation, user_props, expiry_s,"
                " received_wall, coalesce(a.n, 0) FROM jobs LEFT JOIN attempts a USING (key)"
                " WHERE state = 'queued' ORDER BY jobs.rowid"
            ).fetchall()
        return [
            StoredJob(r[0], r[1], bytes(r[2]), r[3], None if r[4] is None else bytes(r[4]),
                      _props(r[5]), r[6], r[7], r[8])
            for r in rows
        ]

    def started(self, key: str) -> None:
        """Count a run about to start (before the runtime sees the job)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO attempts (key, n) VALUES (?, 1)"
                " ON CONFLICT(key) DO UPDATE SET n = n + 1", (key,))

    def prune(self, older_than_wall: float) -> int:
        """Forget answers older than the dedup window."""
        with self._lock:
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
        """Queue a message that is no job's final answer (an event, a refusal, a partial)."""
        with self._lock:
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

    def acked(self, seqs: Sequence[int]) -> int:
        """Forget messages the broker acknowledged; returns the bytes freed."""
        if not seqs:
            return 0
        marks = ",".join("?" * len(seqs))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (size,) = self._db.execute(
                    f"SELECT coalesce(sum(length(payload)), 0) FROM outbox WHERE seq IN ({marks})",  # noqa: S608 - placeholders only
                    list(seqs),
                ).fetchone()
                self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", list(seqs))  # noqa: S608
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(size)

    def outbox_stats(self) -> tuple[int, int]:
        """(messages, bytes) waiting for the broker."""
        with self._read_lock:
            n, size = self._reader.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
            ).fetchone()
        return int(n), int(size)

    # --- counters ------------------------------------------------------------------------

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._bump(name, by)

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0
