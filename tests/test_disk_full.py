"""Disk full loses nothing (issue 12): a real agent whose state_dir is an 8 MB tmpfs.

While the disk is full, a job that cannot be journaled is answered UNAVAILABLE naming the
disk (with `held: true`: its answer follows) and is not acknowledged; a job already
acknowledged whose answer cannot be written keeps its answer in memory; a `disk_full`
event goes out. Once the filler is deleted, the agent catches up by itself, without a
restart: every job gets its answer with outputs and `disk_recovered` goes out. The same
after a restart on a full disk.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.probes.disk_full import fill, journal_keys, mount_tmpfs, unmount
from edgeinfer.agent.journal import SPOOL_MIN_BYTES, DiskFull
from edgeinfer.contract.topics import Topics
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import Replies, Watch, build_slow, deploy, wait_state
from tests.test_job_path import FakeSession, Stack, check_durable_order, job

DEVICE = "gw-disk"


@pytest.fixture
def state_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "state"
    why = mount_tmpfs(where)
    if why is not None:
        pytest.skip(f"an 8 MB tmpfs is needed for the state dir: {why}")
    try:
        yield where
    finally:
        unmount(where)


def body(job_id: str, pad: int = 0) -> bytes:
    doc: dict[str, Any] = {"id": job_id, "model_name": "slow", "inputs": [
        {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    if pad:
        doc["parameters"] = {"pad": "p" * pad}  # over the spool threshold: a spool file
    return json.dumps(doc).encode()


def final_answers(replies: Replies) -> dict[str, dict[str, Any]]:
    """Per job id, its answer with outputs (the final one), if it came."""
    return {c.decode(): a for c, answers in replies.by_correlation().items()
            for a in answers if "error" not in a}


def refusals(replies: Replies) -> dict[str, dict[str, Any]]:
    return {c.decode(): a for c, answers in replies.by_correlation().items()
            for a in answers if "error" in a}


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_full_state_disk_loses_nothing(tmp_path: Path, state_disk: Path) -> None:
    # ~0.1 s a job (64 MatMuls of 512x512): jobs are still running when the disk fills.
    model = build_slow(tmp_path / "model", matmuls=64, size=512)
    broker = Broker(tmp_path / "broker")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, DEVICE, state_dir=str(state_disk),
                         log={"level": "INFO"})
    agent.start()
    topics = Topics("edge/v1", DEVICE)
    events: Watch | None = None
    replies: Replies | None = None
    fillers: list[Path] = []
    try:
        wait_state(broker.url, "online", DEVICE)
        assert deploy(broker.url, tmp_path, "--model", "slow", "--version", "1",
                      "--file", str(model), "--wait", "60", device=DEVICE) == 0
        events = Watch(broker.url, topics.events)
        replies = Replies(broker.url)
        sent: list[str] = []

        def send(job_id: str, pad: int = 0) -> None:
            sent.append(job_id)
            assert replies is not None
            replies.send(topics.jobs, body(job_id, pad), job_id.encode())

        # 1. Jobs acknowledged, then the disk fills while they run: their answers wait.
        running = [f"run-{i}" for i in range(6)]
        for job_id in running:
            send(job_id)
        wait_until(lambda: set(running) <= journal_keys(state_disk), 10, "jobs not journaled")
        fillers.append(fill(state_disk))
        # 2. Jobs that arrive now cannot be journaled (one of them would be spooled).
        burst = [f"full-{i}" for i in range(5)]
        for i, job_id in enumerate(burst):
            send(job_id, SPOOL_MIN_BYTES + 100 if i == 0 else 0)
        wait_until(lambda: set(burst) <= set(refusals(replies)), 10,
                   f"not all told UNAVAILABLE: {replies.by_correlation()}")
        events.wait_for(lambda e: e["type"] == "disk_full", 10)
        time.sleep(1.0)  # time enough for every running job to have finished its run
        assert not set(burst) & journal_keys(state_disk), "journaled on a full disk?"
        answered_while_full = set(final_answers(replies))
        assert not set(burst) & answered_while_full
        assert len(set(running) & answered_while_full) < len(running), \
            "every answer was written before the disk filled: the test missed its case"

        # 3. A restart on the full disk: online, and new jobs are told, not lost.
        agent.stop()
        fillers.append(fill(state_disk, name="filler2"))  # the stop freed some space
        agent.start()
        wait_state(broker.url, "online", DEVICE, timeout=30)
        after = [f"restart-{i}" for i in range(3)]
        for job_id in after:
            send(job_id)
        wait_until(lambda: set(after) <= set(refusals(replies)), 15,
                   f"not told after the restart: {replies.by_correlation()}")
        for answer in refusals(replies).values():
            assert answer["parameters"] == {"code": "UNAVAILABLE", "held": True}, answer
            assert "state disk is full" in answer["error"], answer
            assert str(state_disk) in answer["error"]
            assert "sqlite" not in answer["error"].lower(), answer

        # 4. Space back: everything answered with outputs, no restart.
        for f in fillers:
            f.unlink()
        wait_until(lambda: set(sent) <= set(final_answers(replies)), 30,
                   f"unanswered after space came back: "
                   f"{sorted(set(sent) - set(final_answers(replies)))}")
        for job_id, answer in final_answers(replies).items():
            assert answer["id"] == job_id
            assert np.isfinite(answer["outputs"][0]["data"][0])
        events.wait_for(lambda e: e["type"] == "disk_recovered", 10)
        full = [e for e in events.snapshot() if e["type"] == "disk_full"]
        assert full and full[0]["state_dir"] == str(state_disk), full
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        if events is not None:
            events.close()
        if replies is not None:
            replies.close()
        agent.stop()
        broker.stop()


# --- the scheduler alone (tests/test_job_path.py's stack): a journal that says "full" -----


def full_journal(s: Any, full: threading.Event, *, jobs: bool, answers: bool) -> None:
    """Make `s.journal` refuse commits with jobs and/or answers while `full` is set."""
    real = s.journal.commit

    def commit(js: Sequence[Any], ans: Sequence[Any]) -> Any:
        if full.is_set() and ((jobs and js) or (answers and ans)):
            raise DiskFull(s.journal.path.parent, "SQLITE_FULL")
        return real(js, ans)

    s.journal.commit = commit


def test_an_answer_with_no_room_waits_in_memory_and_goes_out_without_new_jobs(
        tmp_path: Path) -> None:
    s = Stack(tmp_path, FakeSession())
    full = threading.Event()
    full.set()
    full_journal(s, full, jobs=False, answers=True)
    try:
        s.scheduler.start()
        s.scheduler.submit(job(1))
        wait_until(lambda: ("ack", 1) in s.log, 5, "not acknowledged")
        time.sleep(0.3)
        assert not s.published, "an answer went out before its commit"
        full.clear()  # no job arrives from now on: the retry alone must bring it out
        assert [a["id"] for a in s.wait_answers(1)] == ["j1"]
        check_durable_order(s.log)
    finally:
        s.close()


def test_a_job_with_no_room_is_held_unacknowledged_then_admitted(tmp_path: Path) -> None:
    s = Stack(tmp_path, FakeSession())
    full = threading.Event()
    full.set()
    full_journal(s, full, jobs=True, answers=False)
    try:
        s.scheduler.start()
        s.scheduler.submit(job(2))
        wait_until(lambda: any(k == "send_now" for k, _ in s.log), 5, "not told")
        told = json.loads(next(p for k, p in s.log if k == "send_now"))
        assert told["id"] == "j2"
        assert told["parameters"] == {"code": "UNAVAILABLE", "held": True}
        assert "state disk is full" in told["error"]
        time.sleep(0.3)
        assert ("ack", 2) not in s.log
        full.clear()
        assert [a["id"] for a in s.wait_answers(1)] == ["j2"]
        assert [k for k, _ in s.log].count("send_now") == 1, "told more than once"
        check_durable_order(s.log)
    finally:
        s.close()
