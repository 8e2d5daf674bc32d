"""What the bench does with the edge-agent under test: start it and time it to `online`,
deploy a model through the fleet's deploy steps and time it to serving, and capture the
exact bytes it answers a job with (for the echo responders to send back)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench import loadgen
from bench.refmodels import RefModel
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.deploy import (
    ReportWatcher,
    artifact_uri,
    model_spec,
    next_manifest,
    publish_desired,
    read_current,
    store_artifact,
)
from edgeinfer.fleet.mqtt import Connection
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY
from tests.agentproc import AgentProcess

PREFIX = "edge/v1"


def new_agent(work: Path, url: str, device: str) -> AgentProcess:
    return AgentProcess(work, url, device_id=device, log={"level": "INFO"},
                        telemetry={"interval_s": 30.0})


def start_until_online(conn: Connection, agent: AgentProcess, timeout: float = 60.0) -> float:
    """Start `agent`; seconds from process start to its retained `online` arriving."""
    online = threading.Event()
    topic = Topics(PREFIX, agent.device_id).state

    def on_state(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            if json.loads(msg.payload).get("state") == "online":
                online.set()

    conn.subscribe(topic, on_state)
    try:
        t0 = time.perf_counter()
        agent.start()
        if not online.wait(timeout):
            raise RuntimeError(f"agent {agent.device_id} not online after {timeout:g}s:\n"
                               f"{agent.log_text()[-3000:]}")
        return time.perf_counter() - t0
    finally:
        conn.unsubscribe(topic)


def deploy_timed(conn: Connection, store: ArtifactStore, model: RefModel, device: str,
                 timeout: float = 120.0) -> dict[str, Any]:
    """Deploy one model (the fleet's deploy steps) and time publish -> reported serving."""
    assert model.path is not None
    topics = Topics(PREFIX, device)
    artifact = store_artifact(model.path, store)
    spec = model_spec(name=model.name, version="1", artifact=artifact,
                      uri=artifact_uri(artifact, None), health=model.health,
                      max_batch=(model.batching or {}).get("max_batch"),
                      max_delay_ms=(model.batching or {}).get("max_delay_ms"))
    current, applied = read_current(conn, topics)
    manifest = next_manifest(current, upsert=spec, applied=applied)
    watcher = ReportWatcher(conn, topics)
    try:
        t0 = time.perf_counter()
        publish_desired(conn, topics, manifest)
        result = watcher.wait_serving(spec.name, spec.version, spec.sha256, manifest.revision,
                                      timeout)
        seconds = time.perf_counter() - t0
    finally:
        watcher.close()
    entry = result.entry or {}
    return {
        "ok": result.ok, "seconds": round(seconds, 3), "message": result.message,
        "size_bytes": artifact.size, "runtime": entry.get("runtime"), "device": entry.get("device"),
        "precision": entry.get("precision"), "attempts": entry.get("attempts", []),
        "candidates": entry.get("candidates", []), "autotune": entry.get("autotune"),
        "batching": model.batching,
    }


def capture_answer(conn: Connection, device: str, template: loadgen.Template
                   ) -> tuple[bytes, int | None]:
    """The exact bytes the agent answers one job with (for the echo to send back)."""
    reply = f"{PREFIX}/reply/bench-capture/res"
    got: list[tuple[bytes, int | None]] = []
    arrived = threading.Event()

    def on_answer(msg: Any) -> None:
        hlen = None
        for key, value in getattr(msg.properties, "UserProperty", None) or []:
            if key == HEADER_LENGTH_PROPERTY:
                hlen = int(value)
        got.append((bytes(msg.payload), hlen))
        arrived.set()

    conn.subscribe(reply, on_answer)
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply
        props.CorrelationData = b"capture"
        if template.user_properties:
            props.UserProperty = list(template.user_properties)
        conn.publish(Topics(PREFIX, device).jobs, template.payload(), qos=1,
                     properties=props).result(10)
        if not arrived.wait(30):
            raise RuntimeError(f"no answer from {device} to capture")
        return got[0]
    finally:
        conn.unsubscribe(reply)
