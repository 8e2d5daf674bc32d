"""Rollouts end to end: one mosquitto, real agents, real models, the controller's
ingest and rollout engine in this process, the real `edge-fleet` CLI.

The agents, the broker and the controller live for the whole module (starting agents is
what costs time); each test rolls out its own model name to the group `fleet=ro`, first a
baseline version to every device, then the version under test.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import build_digits, build_heavy, build_mlp
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.controller import Controller
from edgeinfer.fleet.mqtt import connect, read_retained
from edgeinfer.fleet.registry import SqlRegistry, open_registry
from edgeinfer.fleet.rollout import RolloutRunner, RolloutStore
from edgeinfer.fleet.signing import Signer, generate_key, load_signer
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import PREFIX, job_body

pytestmark = pytest.mark.timeout(120)

DEVICES = ("gw-a", "gw-b", "gw-c")
GROUP = "fleet=ro"
AGENT_OVERRIDES: dict[str, Any] = {
    "telemetry": {"interval_s": 0.5},
    "runtime": {"prefer": ["onnxruntime"]},  # no auto-tune: installs take a moment
}


@dataclass
class Fleet:
    broker: Broker
    tmp: Path
    db: str
    registry: SqlRegistry
    controller: Controller
    runner: RolloutRunner
    agents: dict[str, AgentProcess]
    models: dict[str, Path]
    key: Path  # agents trust only manifests signed with it

    def cli(self, *args: str) -> int:
        extra = ["--artifact-dir", str(self.tmp / "artifacts")] if args[1] in ("push", "start") \
            else []
        # Only the commands that may talk to the broker take --broker.
        if args[1] in ("start", "resume", "abort"):
            extra += ["--broker", self.broker.url]
        return fleet([*args, "--db", self.db, *extra])

    def push(self, name: str, version: str, model: str) -> None:
        assert self.cli("models", "push", str(self.models[model]), "--name", name,
                        "--version", version) == 0

    def start_agent(self, device: str) -> AgentProcess:
        pub = self.key.with_suffix(".pub").read_text().strip()
        agent = AgentProcess(self.tmp / device, self.broker.url, device_id=device,
                             trust={"keys": {self.key.stem: pub}}, **AGENT_OVERRIDES)
        agent.start()
        self.agents[device] = agent
        return agent

    def new_restarted_runner(self) -> None:
        """What a controller restart does: a new engine over the same registry."""
        self.runner.stop()
        self.runner = _runner(self.registry, self.broker, load_signer(self.key))


def _runner(registry: SqlRegistry, broker: Broker, signer: Signer) -> RolloutRunner:
    return RolloutRunner(registry, lambda: connect(broker.url), prefix=PREFIX,
                         driver="ctl-rollout-test", signer=signer, tick_s=0.2).start()


def until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("rollout")
    broker = Broker(tmp / "broker")
    broker.start()
    models = {"mlp": build_mlp(tmp / "models"), "digits": build_digits(tmp / "models").path,
              "heavy": build_heavy(tmp / "models", width=2048, layers=32)}
    bad = tmp / "models" / "bad.onnx"
    bad.write_bytes(b"this is not an ONNX model" * 10)
    models["bad"] = bad
    db = str(tmp / "registry.sqlite3")
    registry = open_registry(db)
    controller = Controller(registry, broker.url, prefix=PREFIX, client_id="ctl-rollout-test",
                            session_expiry_s=0).start()
    key = generate_key("fleet-ro", tmp / "keys").private
    f = Fleet(broker, tmp, db, registry, controller, _runner(registry, broker, load_signer(key)),
              {}, models, key)
    try:
        for dev in DEVICES:
            registry.set_labels(dev, {"fleet": "ro"})
            f.start_agent(dev)
        until(lambda: all((d := registry.device(x)) and d.online and d.reported_at
                          for x in DEVICES), 60, "agents online")
        yield f
    finally:
        f.runner.stop()
        for agent in f.agents.values():
            agent.stop()
        controller.stop()
        registry.close()
        broker.stop()


def serving(url: str, device: str, name: str) -> str | None:
    """The version of `name` a device reports serving (retained `reported`)."""
    got = read_retained(url, [Topics(PREFIX, device).reported], quiet_s=0.1, timeout_s=2)
    for payload in got.values():
        for m in json.loads(payload).get("models") or []:
            if m.get("name") == name and m.get("state") == "serving":
                return str(m.get("version"))
    return None


def desired_version(url: str, device: str, name: str) -> str | None:
    got = read_retained(url, [Topics(PREFIX, device).desired], quiet_s=0.1, timeout_s=2)
    for payload in got.values():
        for m in json.loads(payload).get("models") or []:
            if m.get("name") == name:
                return str(m.get("version"))
    return None


def all_serve(fl: Fleet, name: str, version: str, devices: tuple[str, ...] = DEVICES,
              timeout: float = 20.0) -> None:
    until(lambda: all(serving(fl.broker.url, d, name) == version for d in devices), timeout,
          f"{devices} serving {name}:{version}")


def store(fl: Fleet) -> RolloutStore:
    return RolloutStore(fl.registry)


def latest_id(fl: Fleet) -> int:
    return store(fl).all()[-1].id


def wait_status(fl: Fleet, rollout_id: int, statuses: set[str], timeout: float = 30.0) -> Any:
    return until(lambda: (r := store(fl).get(rollout_id)) and r.status in statuses and r,
                 timeout, f"rollout {rollout_id} in {statuses}")


def baseline(fl: Fleet, name: str) -> None:
    """`name`:1 (the MLP) on every device of the group, by a one-wave rollout."""
    fl.push(name, "1", "mlp")
    assert fl.cli("rollout", "start", f"{name}:1", "--group", GROUP, "--waves", "100%",
                  "--bake", "0s", "--wait") == 0
    all_serve(fl, name, "1")


class JobLoad:
    """Keeps sending jobs of `rows` x 64 to every device for `name` until stopped."""

    def __init__(self, url: str, name: str, rows: int, period_s: float = 0.1) -> None:
        self.conn = connect(url)
        self.name = name
        self.x = np.ones((rows, 64), np.float32)
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.period_s):
            for dev in DEVICES:
                n += 1  # ids differ: the agent answers a repeated id from its dedup store
                body = job_body(f"load-{n}", self.name, {"x": self.x})
                with contextlib.suppress(Exception):
                    self.conn.publish(Topics(PREFIX, dev).jobs, body, qos=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.close()


# -- the tests --------------------------------------------------------------------------------


def test_healthy_rollout_in_waves_driven_by_the_cli(fl: Fleet, capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    baseline(fl, "ok")
    fl.push("ok", "2", "digits")
    # No controller engine this time: the CLI drives the rollout itself.
    fl.runner.stop()
    try:
        rc = fl.cli("rollout", "start", "ok:2", "--group", GROUP, "--waves", "1,50%,100%",
                    "--max-failures", "0", "--health", "error_rate<1%,p95_ms<500",
                    "--bake", "1s", "--drive", "--sign-key", str(fl.key))
    finally:
        fl.runner = _runner(fl.registry, fl.broker, load_signer(fl.key))
    out = capsys.readouterr()
    assert rc == 0, out
    assert "completed" in out.out
    r = store(fl).get(latest_id(fl))
    assert r is not None
    assert (r.status, r.wave) == ("completed", 2)
    devices = store(fl).devices(r.id)
    assert [(d.device_id, d.wave, d.state) for d in devices] == [
        ("gw-a", 0, "serving"), ("gw-b", 1, "serving"), ("gw-c", 2, "serving")]
    assert all(d.prev_spec and d.prev_spec["version"] == "1" for d in devices)
    all_serve(fl, "ok", "2")
    assert fl.cli("rollout", "status", str(r.id)) == 0
    assert "gw-c  serving" in capsys.readouterr().out


def test_version_that_fails_to_load_halts_and_devices_keep_the_previous(fl: Fleet) -> None:
    baseline(fl, "bad")
    fl.push("bad", "2", "bad")
    assert fl.cli("rollout", "start", "bad:2", "--group", GROUP, "--waves", "1,2,100%",
                  "--max-failures", "1", "--bake", "0.5s") == 0
    r = wait_status(fl, latest_id(fl), {"halted", "completed", "rolled_back"})
    assert r.status == "halted", r
    assert "2 install failures" in (r.reason or "")
    devices = store(fl).devices(r.id)
    # One failure is tolerated, the second halts: the third device is never touched.
    assert [(d.device_id, d.state, d.reverted) for d in devices] == [
        ("gw-a", "failed", True), ("gw-b", "failed", True)]
    for dev in DEVICES:
        assert serving(fl.broker.url, dev, "bad") == "1"
        assert desired_version(fl.broker.url, dev, "bad") == "1"


def test_health_gate_broken_during_bake_rolls_back(fl: Fleet) -> None:
    baseline(fl, "slow")
    fl.push("slow", "2", "heavy")  # 0.3-0.6 s for 256 rows on ONNX Runtime: far over p95_ms<50
    load = JobLoad(fl.broker.url, "slow", rows=256, period_s=0.25)
    try:
        assert fl.cli("rollout", "start", "slow:2", "--group", GROUP, "--waves", "1,100%",
                      "--health", "p95_ms<50,error_rate<50%", "--bake", "3s") == 0
        r = wait_status(fl, latest_id(fl), {"rolled_back", "completed", "halted"})
    finally:
        load.close()
    assert r.status == "rolled_back", r
    assert "p95_ms" in (r.reason or ""), r.reason
    devices = store(fl).devices(r.id)
    assert [(d.device_id, d.state, d.reverted) for d in devices] == [("gw-a", "serving", True)]
    all_serve(fl, "slow", "1")
    assert desired_version(fl.broker.url, "gw-a", "slow") == "1"


def test_pause_resume_restart_abort(fl: Fleet) -> None:
    baseline(fl, "ctl")
    fl.push("ctl", "2", "digits")
    assert fl.cli("rollout", "start", "ctl:2", "--group", GROUP, "--waves", "1,2,100%",
                  "--bake", "1.5s") == 0
    rid = latest_id(fl)
    until(lambda: (r := store(fl).get(rid)) and r.phase == "baking" and r.wave == 0, 20,
          "wave 1 baking")
    assert fl.cli("rollout", "pause", str(rid)) == 0
    time.sleep(2.0)  # longer than the bake: a paused rollout does not advance
    r = store(fl).get(rid)
    assert r is not None
    assert (r.status, r.wave) == ("paused", 0)
    assert fl.cli("rollout", "pause", str(rid)) == 2  # already paused
    assert fl.cli("rollout", "resume", str(rid)) == 0
    # A controller restart in the middle: the new engine goes on from the registry.
    fl.new_restarted_runner()
    until(lambda: (r := store(fl).get(rid)) and r.wave == 1 and r.phase == "baking", 20,
          "wave 2 baking")
    assert fl.cli("rollout", "abort", str(rid), "--wait") == 1  # ends aborted: exit 1
    r = store(fl).get(rid)
    assert r is not None
    assert r.status == "aborted"
    devices = store(fl).devices(r.id)
    assert [(d.device_id, d.reverted) for d in devices] == [("gw-a", True), ("gw-b", True)]
    all_serve(fl, "ctl", "1")
    assert fl.cli("rollout", "resume", str(rid)) == 2


def test_late_joining_device_gets_the_current_version(fl: Fleet) -> None:
    baseline(fl, "late")
    fl.push("late", "2", "digits")
    assert fl.cli("rollout", "start", "late:2", "--group", GROUP, "--waves", "100%",
                  "--bake", "0s", "--wait") == 0
    all_serve(fl, "late", "2")
    fl.registry.set_labels("gw-d", {"fleet": "ro"})
    fl.start_agent("gw-d")
    all_serve(fl, "late", "2", devices=("gw-d",), timeout=40)
    rid = latest_id(fl)
    joined = until(lambda: [d for d in store(fl).devices(rid)
                            if d.device_id == "gw-d" and d.state == "serving"], 10, "recorded")
    assert joined[0].prev_spec is None  # it had no such model before
