"""Pool jobs never wait on a dead member (issue 12): two real agents serve one pool on a
real mosquitto; one is SIGKILLed and never restarted; every pool job sent afterwards is
answered by the survivor within the bound (`jobs.pool_keepalive_s`, docs/protocol.md "Pools").

Before the pool had its own session, the broker kept handing the dead member half the jobs
(its persistent session lived on for broker.session_expiry_s)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeinfer.contract.topics import Topics
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import PREFIX, Replies, job_body, wait_state

POOL = "line-9"
KEEPALIVE_S = 2  # jobs.pool_keepalive_s here: the bound is 1.5 x this for a silent host


def start_members(broker: Broker, agents: list[AgentProcess]
                  ) -> tuple[Replies, str, np.ndarray]:
    """Start the pool's members; a job client, the pool's job topic and an input."""
    for a in agents:
        a.start()
    for a in agents:
        wait_state(broker.url, "online", a.device_id)
        # The pool's own session, under a client id that is not the device's.
        a.wait_log(f"as {a.device_id}.pool.", 30)
    return (Replies(broker.url), Topics(PREFIX, agents[0].device_id).pool_jobs(POOL),
            np.zeros((1, 1), np.float32))


def test_pool_jobs_go_to_the_survivor_when_a_member_is_killed(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    agents = [AgentProcess(tmp_path / dev, broker.url, dev,
                           jobs={"pools": [POOL], "pool_keepalive_s": KEEPALIVE_S})
              for dev in ("pf-a", "pf-b")]
    replies: Replies | None = None
    try:
        replies, topic, x = start_members(broker, agents)
        # Both members take pool jobs (so the kill below takes one that had a share).
        before = 20
        for i in range(before):
            replies.send(topic, job_body(f"w{i}", "nosuch", {"x": x}), f"w{i}".encode())
        replies.wait_count(before, 20)
        for a in agents:  # each logged some of them (DEBUG: "job <id>: NOT_FOUND ...")
            assert "job w" in a.log_text(), a.device_id
        agents[0].kill()
        # The broker has seen the death (its will says offline; the pool link, closed by the
        # kernel at the same moment, goes in the same turn of the broker's loop).
        wait_state(broker.url, "offline", "pf-a", 10)
        n = 100
        sent: dict[bytes, float] = {}
        for i in range(n):
            corr = f"j{i}".encode()
            sent[corr] = time.monotonic()
            replies.send(topic, job_body(f"j{i}", "nosuch", {"x": x}), corr)
        replies.wait_count(before + n, 1.5 * KEEPALIVE_S + 10)
        by_corr = replies.by_correlation()
        assert all(len(by_corr.get(c, [])) == 1 for c in sent), "each job answered once"
        waits = [t - sent[c] for c, _, t in replies.answers if c in sent]
        # Answered (NOT_FOUND: no model is deployed; any answer is the survivor's) well
        # within the bound a dead member could hold a job for.
        assert max(waits) < 1.5 * KEEPALIVE_S, sorted(waits)[-5:]
        assert all(a["parameters"]["code"] == "NOT_FOUND"
                   for c, a, _ in replies.answers if c in sent)
    finally:
        if replies is not None:
            replies.close()
        for a in agents:
            a.stop()
        broker.stop()


def test_a_member_stopped_with_sigterm_leaves_no_pool_job_behind(tmp_path: Path) -> None:
    """A drain leaves the device's own jobs with the broker for the next start; a pool job
    left so would be dropped with the pool session. So the member leaves the pool first and
    journals what the broker had already sent it."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    agents = [AgentProcess(tmp_path / dev, broker.url, dev, jobs={"pools": [POOL]})
              for dev in ("ps-a", "ps-b")]
    replies: Replies | None = None
    try:
        replies, topic, x = start_members(broker, agents)
        n = 400
        for i in range(n):
            replies.send(topic, job_body(f"s{i}", "nosuch", {"x": x}), f"s{i}".encode())
            if i == n // 4:
                assert agents[0].proc is not None
                agents[0].proc.terminate()  # SIGTERM while jobs keep coming
        replies.wait_count(n, 30)
        assert agents[0].stop() == 0
        assert "left the pool(s)" in agents[0].log_text()
        by_corr = replies.by_correlation()
        assert sorted(len(v) for v in by_corr.values()) == [1] * n
    finally:
        if replies is not None:
            replies.close()
        for a in agents:
            a.stop()
        broker.stop()
