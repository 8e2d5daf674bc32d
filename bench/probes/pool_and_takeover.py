"""Figures for issue 12 (points 2 and 3), printed; not a test.

(a) Two real agents serve one pool; one is SIGKILLed (never restarted); then 300 pool jobs
    go out at once. Prints how many were answered within the watch window, and the max and
    p99 wait of those answered.
(b) Two real agents with one device id for 30 s: how often each connected (its log's
    "connected to" lines), and the event types seen on the device's events topic.

  python -m bench.probes.pool_and_takeover [--jobs 300] [--window 30] [--dup-s 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeinfer.contract.topics import Topics
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import PREFIX, Replies, Watch, job_body, wait_state

CONNECTED = "connected to mqtt://"  # agent/mqtt_session/ logs it on every CONNACK


def connects(agent: AgentProcess) -> int:
    return agent.log_text().count(CONNECTED)


def pool_failover(root: Path, n_jobs: int, window_s: float) -> None:
    broker = Broker(root / "broker")
    broker.start()
    agents = [AgentProcess(root / name, broker.url, name, jobs={"pools": ["line"]})
              for name in ("pa", "pb")]
    try:
        for a in agents:
            a.start()
        for a in agents:
            wait_state(broker.url, "online", a.device_id)
        time.sleep(1.0)  # both subscribed
        agents[0].kill()
        time.sleep(0.5)
        replies = Replies(broker.url)
        x = np.zeros((1, 1), np.float32)
        topic = Topics(PREFIX, "pa").pool_jobs("line")
        sent: dict[bytes, float] = {}
        for i in range(n_jobs):
            corr = f"j{i}".encode()
            sent[corr] = time.monotonic()
            replies.send(topic, job_body(f"j{i}", "nosuch", {"x": x}), corr)
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline and len(replies.by_correlation()) < n_jobs:
            time.sleep(0.1)
        waits = sorted(t - sent[c] for c, _, t in replies.answers if c in sent)
        answered = len({c for c, _, _ in replies.answers if c in sent})
        if waits:
            p99 = waits[min(len(waits) - 1, int(0.99 * len(waits)))]
            print(f"(a) pool failover: {answered}/{n_jobs} answered within {window_s:g}s "
                  f"by the survivor; wait max {waits[-1]:.2f}s, p99 {p99:.2f}s")
        else:
            print(f"(a) pool failover: 0/{n_jobs} answered within {window_s:g}s")
        replies.close()
    finally:
        for a in agents:
            a.stop()
        broker.stop()


def duplicate_id(root: Path, dup_s: float) -> None:
    broker = Broker(root / "broker")
    broker.start()
    agents = [AgentProcess(root / name, broker.url, "twin") for name in ("ta", "tb")]
    events = Watch(broker.url, Topics(PREFIX, "twin").events)
    try:
        agents[0].start()
        wait_state(broker.url, "online", "twin")
        agents[1].start()
        t0 = time.monotonic()
        agents[1].wait_log(CONNECTED, 30)
        time.sleep(max(0.0, dup_s - (time.monotonic() - t0)))
        counts = [connects(a) for a in agents]
        types: dict[str, int] = {}
        for kind in events.types():
            types[kind] = types.get(kind, 0) + 1
        per_min = sum(counts) / (time.monotonic() - t0) * 60
        print(f"(b) one device id, two agents, {time.monotonic() - t0:.0f}s: connects "
              f"{counts[0]} + {counts[1]} = {sum(counts)} ({per_min:.0f}/min); events: {types}")
        reasons = sorted({str(e.get("reason")) for e in events.snapshot()
                          if e.get("type") != "session_taken_over"})
        print(f"    link-lost reasons in events: {reasons}")
    finally:
        events.close()
        for a in agents:
            a.stop()
        broker.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--window", type=float, default=30.0)
    p.add_argument("--dup-s", type=float, default=30.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pool_failover(Path(tmp) / "a", args.jobs, args.window)
        duplicate_id(Path(tmp) / "b", args.dup_s)


if __name__ == "__main__":
    main()
