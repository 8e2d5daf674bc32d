"""The controller against a real mosquitto: retained state/reported, live telemetry and
events, a restart that loses nothing, a real agent."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeinfer.fleet.controller import Controller, Ingestor, summarize_hardware
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.registry import SqlRegistry, open_registry
from tests.agentproc import AgentProcess
from tests.broker import Broker

P = "edge/v1"

STATE = {"state": "online", "agent_version": "0.1.0", "session_id": "s1",
         "started_at": "2026-01-01T00:00:00Z"}
REPORTED = {
    "device_id": "gw-1", "agent_version": "0.1.0", "revision": 3,
    "models": [{"name": "digits", "version": "3", "sha256": "ab", "state": "serving"}],
    "last_error": None,
    "hardware": {"cpu": {"model": "Cortex-A76", "cores_logical": 4}, "memory_mb": 8000,
                 "nvidia_gpus": [{"index": 0, "name": "Orin", "memory_mb": 8000}],
                 "onnxruntime": {"version": "1.20", "providers": ["CPUExecutionProvider"]},
                 "openvino": {"version": "2025", "devices": {"CPU": "x"}}, "errors": []},
    "updated_at": "2026-01-01T00:00:05Z",
}


def _publish(broker: Broker, messages: dict[str, Any], *, retain: bool) -> None:
    with connect(broker.url) as conn:
        for topic, doc in messages.items():
            payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            conn.publish(topic, payload, retain=retain).result(2)


def _until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Running:
    """A controller (own client id) over a registry, stopped and closed by `close`."""

    def __init__(self, broker: Broker, target: str, client_id: str) -> None:
        self.registry: SqlRegistry = open_registry(target)
        self.controller = Controller(self.registry, broker.url, prefix=P,
                                     client_id=client_id, session_expiry_s=300).start()
        assert self.controller.connected.wait(5)

    def close(self) -> None:
        self.controller.stop()
        self.registry.close()


def test_ingest_retained_live_and_restart(broker: Broker, registry_target: str) -> None:
    client_id = f"ctl-{uuid.uuid4().hex[:8]}"
    # Retained before the controller exists: it learns them when it subscribes.
    _publish(broker, {f"{P}/dev/gw-1/state": STATE, f"{P}/dev/gw-1/reported": REPORTED,
                      f"{P}/dev/cam-2/state": b"offline",
                      "other/v1/dev/zz/state": STATE}, retain=True)
    run = Running(broker, registry_target, client_id)
    try:
        reg = run.registry
        _until(lambda: len(reg.devices()) == 2)
        gw = _until(lambda: (d := reg.device("gw-1")) and d.revision == 3 and d)
        assert gw.online is True
        assert gw.agent_version == "0.1.0"
        assert gw.session_id == "s1"
        assert gw.models[0]["name"] == "digits"
        assert gw.hardware["gpus"] == ["Orin"]
        # Retained: last seen is the document's own time, not "now".
        assert gw.last_seen == "2026-01-01T00:00:05.000Z"
        cam = reg.device("cam-2")
        assert cam is not None
        assert (cam.online, cam.state) == (False, "offline")

        # Live telemetry and events.
        _publish(broker, {f"{P}/dev/gw-1/telemetry": {"ts": "x", "queue_depth": 4},
                          f"{P}/dev/gw-1/events": {"ts": "2026-01-01T00:01:00Z",
                                                   "type": "deploy_started",
                                                   "device_id": "gw-1"},
                          f"{P}/dev/gw-1/extra/events": {"type": "nope"},
                          f"{P}/dev/gw-1/telemetry/x": {"queue_depth": 9}}, retain=False)
        _until(lambda: reg.telemetry("gw-1"))
        _until(reg.events)
        assert run.controller.wait_idle()
        telemetry = reg.telemetry("gw-1")
        assert telemetry is not None
        assert telemetry.body["queue_depth"] == 4
        assert [e.type for e in reg.events()] == ["deploy_started"]
        gw = reg.device("gw-1")
        assert gw is not None
        assert gw.last_seen is not None
        assert gw.last_seen > "2026-01-02"  # live: now
        reg.set_labels("gw-1", {"site": "berlin"})
        assert run.controller.status()["connected"] is True
    finally:
        run.close()

    # While the controller is down: the device goes offline, reports, and sends an event.
    _publish(broker, {f"{P}/dev/gw-1/state": {**STATE, "state": "offline"},
                      f"{P}/dev/gw-1/reported": {**REPORTED, "revision": 4}}, retain=True)
    _publish(broker, {f"{P}/dev/gw-1/events": {"type": "deploy_finished",
                                               "device_id": "gw-1"}}, retain=False)

    run = Running(broker, registry_target, client_id)
    try:
        reg = run.registry
        # The persistent session kept the event; the retained topics refresh the rest.
        _until(lambda: [e.type for e in reg.events()] == ["deploy_finished", "deploy_started"])
        gw = _until(lambda: (d := reg.device("gw-1")) and d.revision == 4 and d)
        assert gw.online is False
        assert gw.labels == {"site": "berlin"}  # labels live only in the registry
        telemetry = reg.telemetry("gw-1")
        assert telemetry is not None
        assert telemetry.body["queue_depth"] == 4
    finally:
        run.close()


def test_controller_waits_for_a_late_broker(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    reg = open_registry(tmp_path / "r.sqlite3")
    controller = Controller(reg, broker.url, prefix=P, client_id="ctl-late")
    controller.client.reconnect_delay_set(1, 1)
    controller.start()
    try:
        time.sleep(0.3)
        assert not controller.connected.is_set()
        broker.start()
        try:
            assert controller.connected.wait(10)
            _publish(broker, {f"{P}/dev/gw-9/state": STATE}, retain=True)
            _until(lambda: reg.device("gw-9"))
        finally:
            controller.stop()
            broker.stop()
    finally:
        reg.close()


def test_real_agent(broker: Broker, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", broker.url, device_id="gw-real")
    reg = open_registry(tmp_path / "r.sqlite3")
    controller = Controller(reg, broker.url, prefix=P, client_id="ctl-agent").start()
    agent.start()
    try:
        dev = _until(lambda: (d := reg.device("gw-real")) and d.online and d.reported_at
                     and d, timeout=30)
        assert dev.agent_version
        assert dev.session_id
        assert dev.hardware["memory_mb"] > 0
        _until(lambda: reg.telemetry("gw-real"), timeout=10)  # every 1 s in AgentProcess
        assert agent.stop() == 0
        dev = _until(lambda: (d := reg.device("gw-real")) and d.online is False and d)
        assert dev.state == "offline"
    finally:
        agent.stop()
        controller.stop()
        reg.close()


def test_ingestor_without_broker(tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "r.sqlite3")
    try:
        ing = Ingestor(reg, "edge/v1/")
        assert ing.filters() == [("edge/v1/dev/+/state", 1), ("edge/v1/dev/+/reported", 1),
                                 ("edge/v1/dev/+/telemetry", 0), ("edge/v1/dev/+/events", 1)]
        assert not ing.handle("edge/v1/dev/gw-1/state", b"")  # retained deletion
        assert not ing.handle("edge/v1/dev/gw-1/jobs", b"{}")
        assert not ing.handle("edge/v1/dev/bad.id/state", b"online")
        assert not ing.handle("edge/v1/dev/gw-1/reported", b"\xff junk")
        assert not ing.handle("edge/v1/dev/gw-1/events", b"[1, 2]")
        assert ing.handle("edge/v1/dev/gw-1/state", b"online")  # a hand-made bare word
        assert ing.handle("edge/v1/dev/gw-1/reported",
                          b'{"revision": "x", "models": [1, {"name": "m"}], "hardware": 5}')
        dev = reg.device("gw-1")
        assert dev is not None
        assert dev.online is True
        assert dev.revision is None
        assert dev.models == [{"name": "m"}]
        assert dev.hardware == {}
    finally:
        reg.close()
    assert summarize_hardware(REPORTED["hardware"]) == {
        "cpu_model": "Cortex-A76", "cores": 4, "memory_mb": 8000, "gpus": ["Orin"],
        "onnxruntime_providers": ["CPUExecutionProvider"], "openvino_devices": ["CPU"]}
