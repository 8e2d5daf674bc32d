"""Lose nothing, run nothing twice: 1,000 jobs through real faults.

Each run sends 1,000 jobs (at most 64 unanswered) from a client with a persistent session
that retries unanswered jobs under the same id, while the broker or the agent is killed
with SIGKILL, or the broker is frozen past the keepalive. Afterwards every job has an
answer with the right label, and the agent's journal shows each job executed exactly once
(executions are counted in the same transaction that records the answer).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench.models import DigitsModel, build_heavy
from edgeinfer.agent.journal import RUNNING_FILE
from edgeinfer.agent.runslots import read_running, run_tag
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import DeadlineExceeded, Internal
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import deploy, persistent_broker, wait_state
from tests.loadclient import LoadClient, Tally

JOBS = 1000
DEVICE = "gw-fault"


@dataclass
class Stack:
    broker: Broker
    agent: AgentProcess
    tmp: Path


@pytest.fixture
def stack(tmp_path: Path, digits: DigitsModel) -> Iterator[Stack]:
    # autosave_on_changes with interval 1: mosquitto writes its state after every change,
    # so a SIGKILLed broker comes back with the sessions and queued messages it had.
    broker = persistent_broker(tmp_path / "broker", "autosave_on_changes true\n")
    broker.start()
    agent = AgentProcess(
        tmp_path / "agent", broker.url, DEVICE,
        broker={"keepalive_s": 5, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        log={"level": "INFO"},
    )
    agent.start()
    try:
        wait_state(broker.url, "online", DEVICE)
        assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                      "--file", str(digits.path), "--wait", "60", device=DEVICE) == 0
        yield Stack(broker, agent, tmp_path)
    finally:
        agent.stop()
        broker.stop()


def bodies(digits: DigitsModel) -> dict[str, bytes]:
    n = len(digits.x_test)
    return {
        f"job-{i}": json.dumps({
            "id": f"job-{i}", "model_name": "digits",
            "inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                        "data": digits.x_test[i % n].tolist()}],
            "outputs": [{"name": "label"}],
        }).encode()
        for i in range(JOBS)
    }


def run_with_faults(stack: Stack, digits: DigitsModel,
                    fault: Callable[[int], None], at: list[int]) -> Tally:
    """Send the jobs; call `fault(k)` when the k-th trigger point of sends is reached."""
    client = LoadClient(stack.broker.url, DEVICE)
    pending = list(at)
    faults: list[threading.Thread] = []

    def progress(sent: int) -> None:
        if pending and sent >= pending[0]:
            k = len(at) - len(pending)
            pending.pop(0)
            t = threading.Thread(target=fault, args=(k,), daemon=True)
            t.start()
            faults.append(t)

    try:
        tally = client.run(bodies(digits), window=64, rate_per_s=150, retry_after_s=4.0,
                           timeout_s=240, on_progress=progress)
    finally:
        for t in faults:
            t.join(60)
        client.close()
    return tally


def check(stack: Stack, digits: DigitsModel, tally: Tally) -> dict[str, int]:
    final = tally.final()
    assert len(final) == JOBS, f"{JOBS - len(final)} jobs without an answer"
    n = len(digits.x_test)
    wrong = []
    for i in range(JOBS):
        answer = final[f"job-{i}"]
        assert "error" not in answer, answer
        label = answer["outputs"][0]["data"][0]
        if label != int(digits.sklearn_pred[i % n]):
            wrong.append(i)
    assert not wrong, f"wrong labels for {len(wrong)} jobs"
    stack.agent.stop()
    db = sqlite3.connect(stack.agent.state_dir / "journal.sqlite3")
    try:
        twice = db.execute("SELECT count(*) FROM jobs WHERE executions > 1").fetchone()[0]
        executed = db.execute(
            "SELECT count(*) FROM jobs WHERE key LIKE 'id:edge/v1/reply/loadclient/%'"
            " AND executions = 1").fetchone()[0]
        unanswered = db.execute("SELECT count(*) FROM jobs WHERE state != 'done'").fetchone()[0]
        outbox = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        db.close()
    assert twice == 0, f"{twice} jobs executed twice"
    assert executed == JOBS
    assert unanswered == 0
    figures = {"sent": tally.publishes, "resent": tally.resends, "answered": len(final),
               "lost": JOBS - len(final), "duplicate_answers": tally.duplicates(),
               "executed_twice": twice, "outbox_left": outbox}
    print(f"\nfault run: {figures}")
    return figures


def test_broker_killed_five_times(stack: Stack, digits: DigitsModel) -> None:
    def kill_broker(_: int) -> None:
        stack.broker.kill()
        time.sleep(0.3)
        stack.broker.start()

    tally = run_with_faults(stack, digits, kill_broker, [100, 250, 400, 550, 700])
    check(stack, digits, tally)


def test_agent_killed_five_times(stack: Stack, digits: DigitsModel) -> None:
    def kill_agent(_: int) -> None:
        stack.agent.kill()
        time.sleep(0.3)
        stack.agent.start()

    tally = run_with_faults(stack, digits, kill_agent, [100, 250, 400, 550, 700])
    assert stack.agent.log_text().count("restored 1 model(s)") >= 6
    check(stack, digits, tally)


def test_broker_frozen_past_keepalive(stack: Stack, digits: DigitsModel) -> None:
    def freeze(_: int) -> None:
        stack.broker.freeze()
        time.sleep(5 * 1.5 + 1)  # the agent's keepalive is 5 s
        stack.broker.thaw()

    tally = run_with_faults(stack, digits, freeze, [300])
    check(stack, digits, tally)


def test_deadline_passed_while_agent_down_is_not_run(tmp_path: Path, digits: DigitsModel) -> None:
    broker = persistent_broker(tmp_path / "broker")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, DEVICE)
    agent.start()
    try:
        wait_state(broker.url, "online", DEVICE)
        assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                      "--file", str(digits.path), "--wait", "60", device=DEVICE) == 0
        agent.kill()
        with InferenceClient(broker.url) as client:
            # Sent while the agent is down; the broker keeps them in its session.
            late = [client.submit("digits", {"x": digits.x_test[i : i + 1]}, device=DEVICE,
                                  parameters={"timeout_ms": 1000}, timeout=60)
                    for i in range(5)]
            fresh = client.submit("digits", {"x": digits.x_test[:1]}, device=DEVICE,
                                  parameters={"timeout_ms": 60_000}, timeout=60)
            time.sleep(2.0)
            agent.start()
            for f in late:
                with pytest.raises(DeadlineExceeded):
                    f.result(60)
            assert int(fresh.result(60).outputs["label"][0]) == int(digits.sklearn_pred[0])
    finally:
        agent.stop()
        broker.stop()
    db = sqlite3.connect(agent.state_dir / "journal.sqlite3")
    try:
        ran = db.execute("SELECT sum(executions) FROM jobs").fetchone()[0]
    finally:
        db.close()
    assert ran == 1  # only the fresh job ran


def test_journaled_jobs_past_deadline_after_restart(tmp_path: Path) -> None:
    """Jobs accepted into the journal, then the agent dies: after the restart those whose
    deadline passed meanwhile are answered DEADLINE_EXCEEDED, not run."""
    broker = persistent_broker(tmp_path / "broker")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, DEVICE, jobs={"workers": 1})
    agent.start()
    heavy = build_heavy(tmp_path / "m", width=2048, layers=32)
    try:
        wait_state(broker.url, "online", DEVICE)
        assert deploy(broker.url, tmp_path, "--model", "heavy", "--version", "1",
                      "--file", str(heavy), "--prefer", "onnxruntime", "--wait", "60",
                      device=DEVICE) == 0
        x = np.random.default_rng(0).random((256, 64), dtype=np.float32)  # ~0.5 s each
        with InferenceClient(broker.url) as client:
            futures = [client.submit("heavy", {"x": x}, device=DEVICE, binary=True,
                                     parameters={"timeout_ms": 3000}, timeout=60)
                       for _ in range(8)]
            time.sleep(1.0)  # a job or two ran; the rest wait in the journal
            agent.kill()
            time.sleep(3.5)
            agent.start()
            codes = []
            for f in futures:
                try:
                    f.result(60)
                    codes.append("OK")
                except DeadlineExceeded:
                    codes.append("DEADLINE_EXCEEDED")
        assert "DEADLINE_EXCEEDED" in codes
        assert "recovered" in agent.log_text()
    finally:
        agent.stop()
        broker.stop()
    db = sqlite3.connect(agent.state_dir / "journal.sqlite3")
    try:
        ran = db.execute("SELECT sum(executions) FROM jobs").fetchone()[0]
    finally:
        db.close()
    assert ran == codes.count("OK")


def test_job_slower_than_three_keepalives_keeps_the_connection(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, DEVICE,
                         broker={"keepalive_s": 1}, jobs={"workers": 1})
    agent.start()
    heavy = build_heavy(tmp_path / "m", width=2048, layers=32)
    try:
        online = wait_state(broker.url, "online", DEVICE)
        assert deploy(broker.url, tmp_path, "--model", "heavy", "--version", "1",
                      "--file", str(heavy), "--prefer", "onnxruntime", "--wait", "60",
                      device=DEVICE) == 0
        x = np.random.default_rng(0).random((4096, 64), dtype=np.float32)
        with InferenceClient(broker.url) as client:
            t0 = time.monotonic()
            result = client.infer("heavy", {"x": x}, device=DEVICE, binary=True, timeout=120)
            took = time.monotonic() - t0
        assert took > 3 * 1, f"the job took only {took:.1f}s; make it heavier"
        assert result.outputs["y"].shape == (4096, 10)
        again = wait_state(broker.url, "online", DEVICE)
        assert again["session_id"] == online["session_id"]
        log = agent.log_text()
        assert "connection to" not in log and "disconnected" not in log
    finally:
        agent.stop()
        broker.stop()


def test_repeated_job_id_is_answered_from_the_journal_not_run_again(
    stack: Stack, digits: DigitsModel
) -> None:
    client = LoadClient(stack.broker.url, DEVICE, client_id="repeater")
    try:
        body = bodies(digits)["job-7"]
        for attempt in range(3):
            client.publish("job-7", body)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(client.tally.answers.get("job-7", [])) <= attempt:
                time.sleep(0.02)
        answers = client.tally.answers["job-7"]
        assert len(answers) == 3
        # The stored answer, marked as served again.
        replayed = {**answers[0], "parameters": {**answers[0]["parameters"], "replayed": True}}
        assert "replayed" not in answers[0]["parameters"]
        assert answers[1] == answers[2] == replayed
    finally:
        client.close()
    stack.agent.stop()
    db = sqlite3.connect(stack.agent.state_dir / "journal.sqlite3")
    try:
        (executions,) = db.execute(
            "SELECT executions FROM jobs WHERE key = 'id:edge/v1/reply/repeater/r|job-7'"
        ).fetchone()
    finally:
        db.close()
    assert executions == 1


def test_job_that_keeps_dying_with_the_agent_is_answered_not_rerun(tmp_path: Path) -> None:
    broker = persistent_broker(tmp_path / "broker")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, DEVICE, jobs={"workers": 1},
                         log={"level": "INFO"})
    agent.start()
    heavy = build_heavy(tmp_path / "m", width=2048, layers=32)
    journal = agent.state_dir / "journal.sqlite3"

    def attempts() -> int:
        """Runs of the one unanswered job: those the journal charged after restarts, plus
        the one under way if its tag is in the running slots (agent/runslots.py)."""
        db = sqlite3.connect(journal)
        try:
            row = db.execute("SELECT key, received_wall FROM jobs WHERE state = 'queued'").fetchone()
            if row is None:
                return -1
            tag = run_tag(row[0], row[1])
            charged = db.execute("SELECT coalesce(sum(n), 0) FROM attempts WHERE key IN (?, ?)",
                                 (tag.decode(), row[0])).fetchone()[0]
        finally:
            db.close()
        running = read_running(journal.with_name(journal.name + "." + RUNNING_FILE))
        return int(charged) + running.count(tag)

    try:
        wait_state(broker.url, "online", DEVICE)
        assert deploy(broker.url, tmp_path, "--model", "heavy", "--version", "1",
                      "--file", str(heavy), "--prefer", "onnxruntime", "--wait", "60",
                      device=DEVICE) == 0
        x = np.random.default_rng(0).random((4096, 64), dtype=np.float32)  # seconds of work
        with InferenceClient(broker.url) as client:
            future = client.submit("heavy", {"x": x}, device=DEVICE, binary=True, timeout=120)
            for k in range(1, 4):
                deadline = time.monotonic() + 30
                while attempts() < k and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert attempts() == k
                agent.kill()  # as if the job had crashed the runtime
                agent.start()
            with pytest.raises(Internal, match="started 3 times"):
                future.result(60)
    finally:
        agent.stop()
        broker.stop()
