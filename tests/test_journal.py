"""The journal's count of runs cut short by a dead agent (agent/runslots.py), with real
processes killed by SIGKILL while a job runs."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edgeinfer.agent.journal import SPOOL_DIR, SPOOL_MIN_BYTES, Journal, StoredJob
from edgeinfer.agent.runslots import SLOT_TAGS


def _job(key: str, wall: float = 1000.0) -> StoredJob:
    return StoredJob(key=key, topic="edge/v1/dev/gw/jobs", payload=b"{}", response_topic=None,
                     correlation=None, user_props=(), expiry_s=None, received_wall=wall)


def _attempts(path: Path) -> dict[str, int]:
    journal = Journal(path)
    try:
        return {j.key: j.attempts for j in journal.pending()}
    finally:
        journal.close()


def _run_then_die(path: Path, keys: list[str], wall: float) -> None:
    """A process that marks `keys` running, then is killed by SIGKILL mid-run."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from edgeinfer.agent.journal import Journal
        j = Journal(Path({str(path)!r}))
        j.running([(k, {wall!r}) for k in {keys!r}])
        print("running", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_run_cut_short_by_sigkill_is_counted_once_per_death(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.admit([_job("a"), _job("b")])
    journal.close()
    for death in (1, 2, 3):
        _run_then_die(path, ["a"], 1000.0)
        assert _attempts(path) == {"a": death, "b": 0}


def test_a_finished_run_is_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.admit([_job("a")])
    journal.running([("a", 1000.0)])
    journal.done_running()  # the job failed without killing the agent: it may run again
    journal.close()
    assert _attempts(path) == {"a": 0}


def test_a_reused_job_id_does_not_inherit_old_runs(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.admit([_job("a", 1000.0)])
    journal.close()
    _run_then_die(path, ["a"], 1000.0)
    journal = Journal(path)
    assert [j.attempts for j in journal.pending()] == [1]
    journal.complete("a", True, "t", b"answer", None, ())
    journal.prune(time.time() + 1)  # past the dedup window: the id may be used again
    journal.admit([_job("a", 2000.0)])
    assert [j.attempts for j in journal.pending()] == [0]
    journal.close()
    assert _attempts(path) == {"a": 0}


def test_a_batch_larger_than_a_slot_is_still_counted(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    keys = [f"k{i}" for i in range(SLOT_TAGS + 5)]
    journal = Journal(path)
    journal.admit([_job(k) for k in keys])
    journal.close()
    _run_then_die(path, keys, 1000.0)
    counts = _attempts(path)
    assert set(counts.values()) == {1} and len(counts) == len(keys)


def test_threads_have_their_own_slots(tmp_path: Path) -> None:
    """Two threads running at once; one finishes, the other dies with the process."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.admit([_job("x"), _job("y")])
    journal.close()
    code = textwrap.dedent(f"""
        import threading, time
        from pathlib import Path
        from edgeinfer.agent.journal import Journal
        j = Journal(Path({str(path)!r}))
        def finishes():
            j.running([("x", 1000.0)])
            j.done_running()
        j.running([("y", 1000.0)])
        t = threading.Thread(target=finishes); t.start(); t.join()
        print("running", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "running"
    proc.kill()
    proc.wait(10)
    assert _attempts(path) == {"x": 0, "y": 1}


def _spool_files(path: Path) -> list[Path]:
    return sorted(path.with_name(path.name + "." + SPOOL_DIR).iterdir())


def test_large_payloads_live_in_spool_files_until_answered(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    big = os.urandom(SPOOL_MIN_BYTES + 1)
    small = b'{"inputs": []}'
    journal = Journal(path)
    decisions = journal.admit([
        StoredJob("big", "t", big, None, None, (), None, 1000.0),
        StoredJob("small", "t", small, None, None, (), None, 1000.0),
    ])
    assert [d.kind for d in decisions] == ["new", "new"]
    (spooled,) = _spool_files(path)
    assert spooled.read_bytes() == big
    # A repeat of the big job is recognised without leaving a second file behind.
    again = journal.admit([StoredJob("big", "t", big, None, None, (), None, 2000.0)])
    assert [d.kind for d in again] == ["duplicate_pending"] and len(_spool_files(path)) == 1
    journal.close()
    _run_then_die(path, [], 0.0)  # a process that opens it and is SIGKILLed
    journal = Journal(path)
    assert {j.key: j.payload for j in journal.pending()} == {"big": big, "small": small}
    journal.complete("big", True, "t", b"answer", None, ())
    assert _spool_files(path) == []
    assert [j.key for j in journal.pending()] == ["small"]
    journal.close()


def test_spool_files_of_uncommitted_admissions_are_removed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    orphan = path.with_name(path.name + "." + SPOOL_DIR) / "0123abcd"
    orphan.write_bytes(b"x" * 10)  # as a crash between the file and its row leaves it
    Journal(path).close()
    assert not orphan.exists()


def test_a_known_key_with_another_request_digest_is_a_conflict(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    first = StoredJob("k", "t", b"{}", None, None, (), None, 1000.0, digest=b"a" * 32)
    same = StoredJob("k", "t", b"{}", None, b"retry", (), None, 1001.0, digest=b"a" * 32)
    other = StoredJob("k", "t", b"{ }", None, None, (), None, 1002.0, digest=b"b" * 32)
    assert [d.kind for d in journal.admit([first, same, other])] == [
        "new", "duplicate_pending", "conflict"]
    journal.complete("k", True, "t", b"answer", None, ())
    assert [d.kind for d in journal.admit([same, other])] == ["duplicate_done", "conflict"]
    answer = journal.stored_answer("k")
    assert answer is not None and answer.payload == b"answer"
    journal.close()


def test_a_journal_from_before_request_digests_is_migrated(tmp_path: Path) -> None:
    """Its rows have no digest: a repeat of one is answered from it, as before."""
    path = tmp_path / "journal.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (key TEXT PRIMARY KEY, state TEXT NOT NULL, topic TEXT NOT NULL,
            payload BLOB, response_topic TEXT, correlation BLOB, user_props TEXT NOT NULL,
            expiry_s INTEGER, received_wall REAL NOT NULL, result_topic TEXT, result BLOB,
            result_props TEXT, executions INTEGER NOT NULL DEFAULT 0, done_wall REAL,
            payload_file TEXT);
        INSERT INTO jobs (key, state, topic, user_props, received_wall, result_topic, result,
            result_props, executions, done_wall)
            VALUES ('old', 'done', 't', '[]', 1000.0, 'r', x'6f6b', '[]', 1, 1001.0);
        INSERT INTO jobs (key, state, topic, payload, user_props, received_wall)
            VALUES ('waiting', 'queued', 't', x'7b7d', '[]', 1000.0);
    """)
    db.close()
    journal = Journal(path)
    assert [j.key for j in journal.pending()] == ["waiting"]
    again = [StoredJob(k, "t", b"{}", None, None, (), None, 2000.0, digest=b"x" * 32)
             for k in ("old", "waiting")]
    assert [d.kind for d in journal.admit(again)] == ["duplicate_done", "duplicate_pending"]
    answer = journal.stored_answer("old")
    assert answer is not None and (answer.topic, answer.payload) == ("r", b"ok")
    journal.close()
