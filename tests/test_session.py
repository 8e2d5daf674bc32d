"""The agent's MQTT session, proven against a real mosquitto and real agent processes.

Persistent session (jobs wait in the broker while the agent is away), reconnect after a
broker restart with and without broker persistence (birth and reported republished), the
agent's own `offline` on a clean stop, jittered backoff, callbacks that never raise out of
paho's thread, and a full job queue that is refused at once without stalling the session.
"""

from __future__ import annotations

import logging
import queue
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import DigitsModel
from edgeinfer.agent.config import BrokerConfig
from edgeinfer.agent.mqtt_session import Inbound, MqttSession, Retained, Route, backoff_delay
from edgeinfer.agent.mqtt_session import session as session_loop
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.mqtt import connect, read_retained
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import (
    PREFIX,
    Replies,
    Watch,
    build_slow,
    deploy,
    job_body,
    persistent_broker,
    reported,
    wait_state,
)


class Stack:
    """One broker and one agent process of a test; `close()` ends whatever still runs."""

    def __init__(self, tmp: Path, device: str, mosquitto: Broker, **agent_overrides: Any) -> None:
        self.tmp = tmp
        self.device = device
        self.topics = Topics(PREFIX, device)
        self.broker = mosquitto
        self.agent = AgentProcess(tmp / device, mosquitto.url, device, **agent_overrides)

    def start(self) -> dict[str, Any]:
        self.broker.start()
        self.agent.start()
        return wait_state(self.broker.url, "online", self.device, timeout=20)

    def deploy(self, name: str, path: Path) -> None:
        assert deploy(self.broker.url, self.tmp, "--model", name, "--version", "1",
                      "--file", str(path), "--prefer", "onnxruntime", "--wait", "30",
                      device=self.device) == 0

    def broker_log(self) -> str:
        return self.broker.log.read_text(errors="replace")

    def close(self) -> None:
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.proc.send_signal(signal.SIGCONT)  # a test may have left it stopped
        self.agent.stop()
        self.broker.stop()


# The broker logs each connection's protocol, clean start and keepalive ("p5, c0, k10"),
# and whether a client said DISCONNECT ("disconnected") or just dropped ("closed ...").
NOTICE = "log_type notice\n"


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    made: list[Stack] = []

    def make(device: str, persistence: bool = False, **agent_overrides: Any) -> Stack:
        where = tmp_path / f"broker-{device}"
        b = persistent_broker(where, NOTICE) if persistence else Broker(where, extra_conf=NOTICE)
        s = Stack(tmp_path, device, b, **agent_overrides)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()


def digit_jobs(
    replies: Replies, topic: str, digits: DigitsModel, n: int
) -> dict[bytes, tuple[str, int]]:
    """Publish n digits jobs (PUBACKed by the broker); correlation -> (job id, expected label)."""
    sent: dict[bytes, tuple[str, int]] = {}
    acks = []
    for i in range(n):
        correlation = uuid.uuid4().bytes
        job_id = f"j-{i}"
        sent[correlation] = (job_id, int(digits.sklearn_pred[i]))
        acks.append(replies.send(topic, job_body(job_id, "digits", {"x": digits.x_test[i:i + 1]}),
                                 correlation))
    for ack in acks:
        ack.result(5)
    return sent


def check_answered_once(replies: Replies, sent: dict[bytes, tuple[str, int]]) -> None:
    replies.wait_count(len(sent), timeout=20)
    time.sleep(0.3)  # room for a duplicate to show up
    got = replies.by_correlation()
    assert set(got) == set(sent)
    for correlation, (job_id, label) in sent.items():
        assert len(got[correlation]) == 1, f"{job_id} answered {len(got[correlation])} times"
        answer = got[correlation][0]
        assert answer["id"] == job_id, answer
        out = next(o for o in answer["outputs"] if o["name"] == "label")
        assert out["data"] == [label]


# --- persistent session -------------------------------------------------------------------


def test_jobs_sent_while_the_agent_was_killed_are_answered_after_restart(
    stacks: Callable[..., Stack], digits: DigitsModel
) -> None:
    s = stacks("gw-persist")
    s.start()
    s.deploy("digits", digits.path)
    # The broker saw an MQTT v5 client ("p5") that asked for no clean start ("c0").
    assert re.search(r"as gw-persist \(p5, c0, k10\)", s.broker_log()), s.broker_log()
    s.agent.kill()
    wait_state(s.broker.url, "offline", s.device)  # the will: the link is surely gone
    replies = Replies(s.broker.url)
    try:
        sent = digit_jobs(replies, s.topics.jobs, digits, 10)
        time.sleep(0.2)
        assert replies.answers == []  # nobody is there to answer yet
        first_run = len(s.agent.log_text())
        s.agent.start()
        check_answered_once(replies, sent)
        assert "(session present: True)" in s.agent.log_text()[first_run:]
    finally:
        replies.close()


def test_graceful_stop_says_offline_itself_and_keeps_the_session(
    stacks: Callable[..., Stack], digits: DigitsModel
) -> None:
    s = stacks("gw-term")
    online = s.start()
    s.deploy("digits", digits.path)
    states = Watch(s.broker.url, s.topics.state)
    replies = Replies(s.broker.url)
    try:
        states.wait_for(lambda m: m["state"] == "online")
        assert s.agent.stop() == 0
        offline = states.wait_for(lambda m: m["state"] == "offline", timeout=5)
        assert offline["session_id"] == online["session_id"]
        log = s.broker_log()
        # A DISCONNECT was sent, so the broker did not fire the will: the agent said
        # offline itself, before it left.
        assert "Client gw-term disconnected." in log, log
        assert "Client gw-term closed its connection" not in log
        assert wait_state(s.broker.url, "offline", s.device, timeout=1)["session_id"] == (
            online["session_id"])
        # A clean stop keeps the session too: jobs sent meanwhile wait for the next start.
        sent = digit_jobs(replies, s.topics.jobs, digits, 3)
        s.agent.start()
        check_answered_once(replies, sent)
    finally:
        replies.close()
        states.close()


# --- reconnect ----------------------------------------------------------------------------


def test_reconnect_after_restart_of_a_persistent_broker(
    stacks: Callable[..., Stack], digits: DigitsModel
) -> None:
    s = stacks("gw-recon", persistence=True)
    born = s.start()
    s.deploy("digits", digits.path)
    # Stale retained values, persisted across the broker's restart (or replaced by the
    # will as the broker shuts down): only the agent's republish on reconnect can fix them.
    with connect(s.broker.url) as conn:
        conn.publish(s.topics.state, b'{"state": "stale"}', retain=True).result(5)
        conn.publish(s.topics.reported, b'{"stale": true}', retain=True).result(5)
    replies = Replies(s.broker.url)
    try:
        # Hold the agent still while the broker restarts, so the jobs below are surely
        # sent while it is away: they wait in its persisted session.
        agent_proc(s).send_signal(signal.SIGSTOP)
        first_run = len(s.agent.log_text())
        replies.close()
        s.broker.restart()
        got = read_retained(s.broker.url, [s.topics.state], quiet_s=0.1, timeout_s=2)
        assert b"online" not in got.get(s.topics.state, b""), got
        replies = Replies(s.broker.url)
        sent = digit_jobs(replies, s.topics.jobs, digits, 3)
        agent_proc(s).send_signal(signal.SIGCONT)

        online = wait_state(s.broker.url, "online", s.device, timeout=10)
        assert online["session_id"] == born["session_id"]  # the same process, born again
        check_answered_once(replies, sent)
        rep = wait_reported(s, lambda r: "models" in r)
        assert [(m["name"], m["state"]) for m in rep["models"]] == [("digits", "serving")]
        log = s.agent.log_text()[first_run:]
        assert "connection to" in log and "lost; reconnecting" in log
        assert "(session present: True)" in log
    finally:
        replies.close()


def test_reconnect_to_a_broker_that_forgot_everything(
    stacks: Callable[..., Stack], digits: DigitsModel
) -> None:
    s = stacks("gw-amnesia")
    born = s.start()
    s.deploy("digits", digits.path)
    first_run = len(s.agent.log_text())
    s.broker.restart()  # no persistence: sessions, retained state and reported are gone

    # The agent republishes both, subscribes again, and keeps serving what it had
    # although the retained desired state is gone too.
    online = wait_state(s.broker.url, "online", s.device, timeout=10)
    assert online["session_id"] == born["session_id"]
    rep = wait_reported(s, lambda r: "models" in r)
    assert [(m["name"], m["state"]) for m in rep["models"]] == [("digits", "serving")]
    assert read_retained(s.broker.url, [s.topics.desired], quiet_s=0.1, timeout_s=0.5) == {}
    replies = Replies(s.broker.url)
    try:
        check_answered_once(replies, digit_jobs(replies, s.topics.jobs, digits, 3))
    finally:
        replies.close()
    assert "(session present: False)" in s.agent.log_text()[first_run:]


def agent_proc(s: Stack) -> Any:
    assert s.agent.proc is not None
    return s.agent.proc


def wait_reported(s: Stack, pred: Callable[[dict[str, Any]], bool],
                  timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = reported(s.broker.url, s.device)
        if pred(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"reported never matched; last: {last}")


# --- backoff ------------------------------------------------------------------------------


def test_backoff_delay_is_jittered_grows_and_is_capped() -> None:
    low, high = 0.5, 30.0
    for attempt in range(12):
        ceiling = min(high, low * 2 ** attempt)
        delays = [backoff_delay(attempt, low, high) for _ in range(200)]
        assert all(low <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        if ceiling > low:
            assert len(set(delays)) > 150  # jittered, not one fixed value
            assert max(delays) > low + 0.5 * (ceiling - low)  # spread up to the ceiling
    assert backoff_delay(0, low, high) == low  # the first retry is prompt
    assert max(backoff_delay(10_000, low, high) for _ in range(200)) <= high  # no overflow
    assert max(backoff_delay(10_000, low, high) for _ in range(200)) > high / 2


def test_backoff_starts_over_after_each_successful_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []

    def recording(attempt: int, low: float, high: float) -> float:
        attempts.append(attempt)
        return low

    monkeypatch.setattr(session_loop, "backoff_delay", recording)  # where _run looks it up
    broker = Broker(tmp_path / "broker")
    broker.start()
    session = _session(broker.url, "sess-backoff", [])
    try:
        session.start()
        for outage in range(3):
            assert session.connected.wait(5)
            assert session.connect_count == outage + 1
            broker.stop()
            time.sleep(0.3)  # a few failed attempts while the broker is down
            broker.start()
            deadline = time.monotonic() + 5
            while session.connect_count == outage + 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert session.connect_count == 4
        # Each outage's retries count up from 0: a link that worked resets the backoff.
        runs = _runs_from_zero(attempts)
        assert len(runs) == 3, attempts
        assert all(run[1:] == list(range(1, len(run))) and len(run) >= 2 for run in runs), attempts
    finally:
        session.stop()
        broker.stop()


def _runs_from_zero(attempts: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for a in attempts:
        if a == 0 or not runs:
            runs.append([a])
        else:
            runs[-1].append(a)
    return runs


# --- callbacks on paho's network thread ---------------------------------------------------


def _session(url: str, client_id: str, routes: list[Route],
             on_connected: Callable[[], None] = lambda: None) -> MqttSession:
    cfg = BrokerConfig(url=url, keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.2)
    return MqttSession(client_id, cfg, routes, Retained(f"t/{client_id}/state", b"offline"),
                       on_connected)


def test_handlers_that_raise_never_break_the_session(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeinfer.agent.mqtt_session")
    got: queue.Queue[Inbound] = queue.Queue()
    connects = threading.Event()
    sessions: list[MqttSession] = []

    def ok(inbound: Inbound) -> None:
        sessions[-1].ack(inbound.mid, inbound.qos)  # QoS 1 jobs are acknowledged by hand
        got.put(inbound)

    def boom(inbound: Inbound) -> None:
        raise RuntimeError(f"handler bug on {inbound.topic}")

    def on_connected() -> None:
        connects.set()
        raise RuntimeError("on_connected bug")

    # A first session subscribes to an extra topic, then goes away; the broker keeps
    # its subscriptions (clean start off, session expiry) for the next one.
    old = _session(broker.url, "sess-cb", [Route("t/cb/ok", 1, ok), Route("t/cb/old", 1, ok)])
    sessions.append(old)
    old.start()
    assert old.connected.wait(5)
    old.stop()

    session = _session(broker.url, "sess-cb", [Route("t/cb/boom", 1, boom),
                                               Route("t/cb/ok", 1, ok)], on_connected)
    sessions.append(session)
    session.start()
    try:
        assert connects.wait(5) and session.connected.is_set()
        # t/cb/boom is new to this session: publish only once the broker has granted it.
        assert session.subscribed.wait(5)
        with connect(broker.url) as conn:
            for i in range(3):
                conn.publish("t/cb/boom", f"b{i}".encode()).result(5)
            conn.publish("t/cb/old", b"stale").result(5)
            conn.publish("t/cb/ok", b"first").result(5)
            assert got.get(timeout=5).payload == b"first"
            time.sleep(0.3)
            # Still the same connection: nothing escaped into paho's loop.
            assert session.connected.is_set() and session.connect_count == 1
            conn.publish("t/cb/ok", b"second").result(5)
            assert got.get(timeout=5).payload == b"second"
        assert got.empty()
        text = caplog.text
        assert text.count("handler for t/cb/boom failed") == 3
        assert "RuntimeError: handler bug on t/cb/boom" in text
        assert "on_connect handler failed" in text
        assert "message on unhandled topic t/cb/old dropped" in text
        assert "(session present: True)" in text
    finally:
        session.stop()


# --- a full queue is refused at once ------------------------------------------------------


def test_flood_over_the_queue_is_refused_at_once_and_every_job_answered_once(
    stacks: Callable[..., Stack], tmp_path: Path
) -> None:
    workers, queue_size, n = 1, 4, 50
    s = stacks("gw-flood", jobs={"workers": workers, "queue_size": queue_size},
               broker={"keepalive_s": 5})
    online = s.start()
    s.deploy("slow", build_slow(tmp_path / "models"))
    replies = Replies(s.broker.url)
    try:
        x = {"x": np.ones((1, 1), np.float32)}
        bodies = [job_body(f"flood-{i}", "slow", x) for i in range(n)]
        correlations = [uuid.uuid4().bytes for _ in range(n)]
        t0 = time.monotonic()
        acks = [replies.send(s.topics.jobs, b, c) for b, c in zip(bodies, correlations, strict=True)]
        for ack in acks:
            ack.result(5)
        answers = replies.wait_count(n, timeout=30)
        time.sleep(0.5)  # room for a duplicate to show up
        got = replies.by_correlation()
        assert set(got) == set(correlations)
        assert all(len(v) == 1 for v in got.values()), "a job was answered twice"

        ok = sorted(t for _, a, t in answers if "outputs" in a)
        refused = [(a, t) for _, a, t in answers if "outputs" not in a]
        assert all(a["parameters"]["code"] == "RESOURCE_EXHAUSTED" for a, _ in refused), refused
        assert all("full" in a["error"] and "retry later" in a["error"] for a, _ in refused)
        # One job runs, `queue_size` wait; everything else is refused.
        assert queue_size - workers <= len(ok) <= queue_size + workers + 2, len(ok)
        assert len(refused) == n - len(ok)
        # Refusals come at once, while the worker is still on its first jobs: the
        # network thread never waited for room in the queue.
        last_refusal = max(t for _, t in refused)
        assert last_refusal < ok[1], (last_refusal - t0, [t - t0 for t in ok])
        assert ok[-1] - t0 > 3 * 0.1  # the queued jobs really took their time

        # The session lived through it: same birth, no reconnect, still serving.
        assert wait_state(s.broker.url, "online", s.device, timeout=2)["session_id"] == (
            online["session_id"])
        assert "lost; reconnecting" not in s.agent.log_text()
        assert s.agent.log_text().count("connected to") == 1
    finally:
        replies.close()
