"""`edge-agent doctor`'s job round trip through the broker, and its verdict on a broker that
leaves Nagle on (mosquitto's default, `set_tcp_nodelay false`).

The real runs assert only what reproduced every time here (mosquitto 2.0.11, loopback, 2 busy
cores): 50 of 50 probes of 10 jobs had p50 43.4-43.9 ms on the Nagle broker and 0.3-0.9 ms
on the nodelay one, 20 of 20 each with both cores spinning; the rule sits at 20 ms.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from edgeinfer.agent.broker_probe import (
    FIX,
    STALL_EXCESS_MS,
    ProbeError,
    RoundTrips,
    measure_round_trips,
    nagle_stall,
)
from edgeinfer.agent.config import BrokerConfig
from tests.broker import Broker

PREFIX = "edge/v1"
DEVICE = "gw-probe"


@pytest.fixture
def nagle_broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto as Debian ships it in this respect: set_tcp_nodelay false."""
    b = Broker(tmp_path / "nagle-broker", nodelay=False)
    b.start()
    try:
        yield b
    finally:
        b.stop()


# -- the rule, on samples ---------------------------------------------------------------


@pytest.mark.parametrize(("job", "ping", "stalled"), [
    ([0.5, 0.6, 0.4], [0.3, 0.2, 0.3], False),          # loopback, nodelay broker (measured)
    ([43.7, 44.0, 43.5], [0.2, 0.3, 0.2], True),        # loopback, Nagle broker (measured)
    ([60.0, 62.0, 59.0], [30.0, 31.0, 29.0], False),    # a 30 ms link: two crossings, no stall
    ([104.0, 106.0, 105.0], [30.0, 31.0, 29.0], True),  # the same link plus a 40 ms timer
    ([0.5, 44.0, 44.0], [0.2, 0.2, 0.2], True),         # most jobs held: the median says so
    ([0.5, 0.5, 44.0], [0.2, 0.2, 0.2], False),         # one slow job is not a stall
    ([], [0.2], False),
])
def test_the_rule_reads_the_median_against_twice_the_ping(
    job: list[float], ping: list[float], stalled: bool
) -> None:
    assert nagle_stall(job, ping) is stalled
    if job:
        assert RoundTrips(tuple(job), tuple(ping)).stalled is stalled


def test_the_threshold_is_half_the_smallest_delayed_ack_timer() -> None:
    assert STALL_EXCESS_MS == 20.0
    assert nagle_stall([20.0 + 2 * 1.0], [1.0]) and not nagle_stall([19.9 + 2 * 1.0], [1.0])


# -- real brokers --------------------------------------------------------------------------


def test_probe_measures_a_nodelay_broker_without_a_stall(broker: Broker) -> None:
    trips = measure_round_trips(BrokerConfig(url=broker.url), PREFIX, DEVICE, count=10)
    assert len(trips.job_ms) == 10 and len(trips.ping_ms) == 10
    assert all(ms > 0 for ms in trips.job_ms + trips.ping_ms)
    assert not trips.stalled, trips


def test_probe_sees_the_stall_of_a_nagle_broker(nagle_broker: Broker) -> None:
    trips = measure_round_trips(BrokerConfig(url=nagle_broker.url), PREFIX, DEVICE, count=10)
    assert trips.stalled, trips


def test_probe_says_which_acl_line_it_needs(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic read nothing/here\n")  # grants the anonymous probe nothing it uses
    b = Broker(tmp_path / "acl-broker", extra_conf=f"acl_file {acl}\n")
    b.start()
    try:
        with pytest.raises(ProbeError) as err:
            measure_round_trips(BrokerConfig(url=b.url), PREFIX, DEVICE, count=2, timeout=2.0)
    finally:
        b.stop()
    # mosquitto 2.0.11 grants the SUBACK and then delivers nothing: either way, the line.
    assert ("refused the subscription" in str(err.value)
            or "no QoS 1 answer came back within 2.0s" in str(err.value))
    assert f"pattern readwrite {PREFIX}/dev/%u/doctor/#" in str(err.value)


# -- edge-agent doctor ---------------------------------------------------------------------


def _doctor(tmp: Path, url: str) -> subprocess.CompletedProcess[str]:
    config = tmp / "agent.yaml"
    config.write_text(yaml.safe_dump({"device_id": DEVICE, "state_dir": str(tmp / "state"),
                                      "broker": {"url": url}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run([sys.executable, "-m", "edgeinfer.agent.cli", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_doctor_passes_a_nodelay_broker(broker: Broker, tmp_path: Path) -> None:
    done = _doctor(tmp_path, broker.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"broker {broker.url}: job round trip p50 " in done.stdout
    assert "QoS 0 ping p50" in done.stdout
    assert "Nagle" not in done.stdout and "set_tcp_nodelay" not in done.stdout


def test_doctor_names_the_stall_and_the_fix_on_a_nagle_broker(
    nagle_broker: Broker, tmp_path: Path
) -> None:
    done = _doctor(tmp_path, nagle_broker.url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"broker {nagle_broker.url}: answers (Success)" in done.stdout
    assert f"broker {nagle_broker.url}: job round trip p50 " in done.stdout
    assert f"  ! {FIX}" in done.stdout
    assert "set `set_tcp_nodelay true` in mosquitto.conf" in done.stdout
