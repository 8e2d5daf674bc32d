"""`edge-fleet simulate`: simulated devices against a real mosquitto, seen by the
controller's registry, and a rollout over a label group of them (completed, and halted
by a version the simulator is told to fail).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.controller import Controller
from edgeinfer.fleet.mqtt import connect, read_retained
from edgeinfer.fleet.registry import SqlRegistry, open_registry
from edgeinfer.fleet.rollout import COMPLETED, HALTED, RolloutRunner, RolloutStore
from edgeinfer.fleet.simulator import SimConfig, Simulator
from tests.broker import Broker
from tests.helpers import PREFIX

pytestmark = pytest.mark.timeout(60)

N = 20
GROUP = "sim=a"


def until(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.05)


def test_simulated_fleet_is_registered_and_takes_a_rollout(broker: Broker, tmp_path: Path) -> None:
    db = str(tmp_path / "registry.sqlite3")
    registry: SqlRegistry = open_registry(db)
    controller = Controller(registry, broker.url, prefix=PREFIX, client_id="ctl-sim-test",
                            session_expiry_s=0).start()
    runner = RolloutRunner(registry, lambda: connect(broker.url), prefix=PREFIX,
                           driver="ctl-sim-test", tick_s=0.2).start()
    sim = Simulator(SimConfig(devices=N, broker_url=broker.url, prefix=PREFIX,
                              report_every_s=0.5, install_delay_s=(0.05, 0.2),
                              fail=frozenset({"m:bad"}), seed=1))
    ids = sim.device_ids
    group = ids[::2]  # every other device
    for device_id in group:
        registry.set_labels(device_id, {"sim": "a"})
    artifacts = tmp_path / "artifacts"

    def cli(*args: str) -> int:
        # `models push` never talks to the broker, so it takes no --broker.
        broker_args = [] if args[0] == "models" else ["--broker", broker.url]
        return fleet([*args, *broker_args, "--db", db, "--artifact-dir", str(artifacts)])

    for version in ("1", "bad"):
        model = tmp_path / f"m{version}.onnx"
        model.write_bytes(f"simulated model {version}".encode() * 8)
        assert cli("models", "push", str(model), "--name", "m", "--version", version) == 0
    sim.start()
    try:
        assert sim.wait_connected(15), sim.stats.line(N)
        # The controller sees every device: online, its reported hardware, its telemetry.
        until(lambda: len([d for d in registry.devices() if d.online and d.reported_at]) == N,
              what="every simulated device registered")
        first_dev = registry.device(ids[0])
        assert first_dev is not None and first_dev.agent_version == "0.1.0+sim"
        assert first_dev.revision is None
        assert first_dev.hardware.get("cores")
        until(lambda: all(registry.telemetry(d) for d in ids), what="telemetry of every device")
        telemetry = registry.telemetry(ids[0])
        assert telemetry is not None and "health" in telemetry.body

        store = RolloutStore(registry)
        assert cli("rollout", "start", "m:1", "--group", GROUP, "--waves", "1,50%,100%",
                   "--bake", "0.3s", "--install-timeout", "10s") == 0
        first = store.all()[-1]
        until(lambda: (r := store.get(first.id)) and r.status == COMPLETED, 20,
              "rollout of m:1 completed")
        done = store.devices(first.id)
        assert sorted(d.device_id for d in done) == group
        assert {d.state for d in done} == {"serving"}
        assert sorted({d.wave for d in done}) == [0, 1, 2]
        # What the devices report (retained) agrees, and the rest were not touched.
        retained = read_retained(broker.url, f"{PREFIX}/dev/+/reported", quiet_s=0.3)
        serving = {json.loads(p)["device_id"] for p in retained.values()
                   if any(m["name"] == "m" and m["version"] == "1" and m["state"] == "serving"
                          for m in json.loads(p)["models"])}
        assert serving == set(group)
        # The telemetry now counts jobs on m:1 (what a rollout's health gate reads).
        until(lambda: (t := registry.telemetry(group[0])) is not None
              and "m:1" in t.body["inference"]["models"], what="m:1 in telemetry")

        # A version the simulator fails: the rollout halts and devices keep m:1.
        assert cli("rollout", "start", "m:bad", "--group", GROUP, "--waves", "1,100%",
                   "--bake", "0.2s", "--install-timeout", "10s") == 0
        second = store.all()[-1]
        halted = until(lambda: (r := store.get(second.id)) and r.status == HALTED and r, 20,
                       "rollout of m:bad halted")
        assert "install failures" in (halted.reason or "")
        failed = [d for d in store.devices(second.id) if d.state == "failed"]
        assert len(failed) == 1 and "configured to fail" in (failed[0].error or "")
        entry = until(lambda: next((m for m in (registry.device(group[0]) or first_dev).models
                                    if m.get("version") == "1" and m.get("state") == "serving"),
                                   None), what="m:1 kept serving")
        assert entry["name"] == "m"
    finally:
        sim.stop()
        # A clean stop says offline (retained), as an agent that stops does. Waited for
        # while the controller still runs: stopped, it records nothing more (a busy machine
        # once lost this race).
        deadline = time.monotonic() + 20
        while (not (offline := all(d.online is False for d in registry.devices()))
               and time.monotonic() < deadline):
            time.sleep(0.05)
        runner.stop()
        controller.stop()
    assert offline, "the controller did not record every simulated device offline within 20 s"
    registry.close()


def test_simulator_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="must match"):
        Simulator(SimConfig(devices=2, id_prefix="bad/"))

