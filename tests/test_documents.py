"""The typed documents of edgeinfer.contract: round trips, lenient reading, and the agent's
documents on the wire as they were when they were built as dicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from edgeinfer.agent.config import load_config
from edgeinfer.agent.daemon import Agent
from edgeinfer.contract import documents, lenient
from edgeinfer.contract.documents import (
    Attempt,
    Autotune,
    Candidate,
    Event,
    Failover,
    Hardware,
    ModelEntry,
    Reported,
    RoleEntry,
    State,
)
from edgeinfer.contract.telemetry import (
    Durability,
    Health,
    Inference,
    ModelFigures,
    Percentiles,
    Telemetry,
    read_telemetry,
)
from edgeinfer.runtimes.hardware import HardwareInfo, NvidiaGpu

SERVING = ModelEntry(
    "digits", "3", "ab" * 32, "serving", runtime="onnxruntime", device="CPU", error=None,
    attempts=[Attempt("openvino", "CPU", False, "no"), Attempt("onnxruntime", "CPU", True, "")],
    precision="f32",
    candidates=[Candidate("onnxruntime", "CPU", "f32", True, "", 1.5, True, 5)],
    autotune=Autotune(cached=False, tuning_s=2.0, reference="onnxruntime/CPU/f32"),
    failovers=[Failover(from_="openvino/CPU", to="onnxruntime/CPU", reason="x",
                        at="2026-01-01T00:00:00Z")],
    roles={"det": RoleEntry(file="det.onnx", sha256="cd", runtime="onnxruntime", device="CPU",
                            precision="f32", candidates=[], autotune=None, attempts=[])},
)


def _round_trip(doc: msgspec.Struct) -> None:
    assert msgspec.json.decode(documents.encode(doc), type=type(doc)) == doc
    assert lenient.decode(documents.encode(doc), type(doc)) == doc


def test_each_document_survives_a_round_trip() -> None:
    _round_trip(State("online", "0.1.0", "s1", "2026-01-01T00:00:00Z"))
    loading = ModelEntry("digits", "4", "ef", "loading")
    _round_trip(Reported(device_id="gw-1", agent_version="0.1.0", revision=3, rollback=True,
                         models=[SERVING, loading], last_error="boom",
                         hardware=msgspec.convert(HardwareInfo().summary(), Hardware),
                         updated_at="2026-01-01T00:00:05Z"))
    _round_trip(Telemetry(ts=1.5, health=Health(cpu_percent=3.0, load_avg=[0.1, 0.2, 0.3],
                                                temperatures_c={"cpu/0": 40.0}),
                          queue_depth=2,
                          inference=Inference(jobs_ok=1, models={"d:3": ModelFigures(
                              ok=1, errors={"INTERNAL": 2}, latency_ms=Percentiles(1, 2, 3))}),
                          durability=Durability(journal_queued=1)))
    _round_trip(Event(ts="2026-01-01T00:00:00Z", type="model_serving", device_id="gw-1",
                      model="digits", version="3", autotune=None, fallbacks=["a/b: c"],
                      bytes_=7))


def test_fields_sent_only_sometimes_stay_off_the_wire() -> None:
    loading = json.loads(documents.encode(ModelEntry("digits", "4", "ef", "loading")))
    assert set(loading) == {"name", "version", "sha256", "state", "runtime", "device", "error",
                            "attempts"}
    serving = json.loads(documents.encode(SERVING))
    assert serving["autotune"]["reference"] == "onnxruntime/CPU/f32"
    assert serving["failovers"][0]["from"] == "openvino/CPU"
    pinned = json.loads(documents.encode(msgspec.structs.replace(SERVING, autotune=None)))
    assert pinned["autotune"] is None  # a pinned serving model says null, not nothing
    assert "temperatures_c" not in json.loads(documents.encode(Health()))


def test_an_old_or_odd_reported_is_read_for_what_it_has() -> None:
    payload = json.dumps({
        "device_id": "gw-1", "revision": "seven",  # wrong type: dropped, not the document
        "from_the_future": {"x": 1},  # unknown: ignored
        "models": [
            {"name": "digits", "version": "3", "state": "serving", "runtime": 5,
             "attempts": [{"runtime": "onnxruntime", "ok": True}, "junk"], "new_key": 1},
            {"version": "no name"},  # lacks a field without a default: this entry dropped
            7,
        ],
        "hardware": {"cpu": {"cores_logical": 4, "flags": "avx"}, "memory_mb": 8000},
    }).encode()  # no agent_version, rollback, last_error, updated_at: an older agent
    got = documents.read_reported(payload)
    assert got is not None
    assert (got.device_id, got.revision, got.rollback, got.last_error) == ("gw-1", None,
                                                                          False, None)
    assert [m.name for m in got.models] == ["digits"]
    entry = got.find_model("digits", "3")
    assert entry is not None and entry.runtime is None and entry.state == "serving"
    assert entry.attempts == [Attempt(runtime="onnxruntime", ok=True)]
    assert entry.precision is msgspec.UNSET and entry.failovers is msgspec.UNSET
    assert got.hardware.cpu.cores_logical == 4 and got.hardware.cpu.flags == []
    assert got.hardware.memory_mb == 8000
    assert documents.read_reported(b"[1, 2]") is None
    assert documents.read_reported(b"\xff junk") is None


def test_odd_state_telemetry_and_events_are_read_leniently() -> None:
    assert documents.state_word(b"offline") == "offline"  # a hand-made bare word will
    assert documents.state_word(b'{"state": 5}') == "unknown"
    state = documents.read_state(b'{"state": "online", "session_id": 12, "extra": true}')
    assert state == State(state="online")
    tele = read_telemetry(json.dumps({
        "ts": 3, "health": {"cpu_percent": "busy", "memory": {"percent": 12}},
        "inference": {"models": {"d:3": {"ok": 2, "errors": 3}, "bad": []}},
    }).encode())  # the simulator's shape: no durability, no state_disk
    assert tele is not None and tele.ts == 3.0 and tele.health.cpu_percent == 0.0
    assert tele.health.memory.percent == 12.0
    assert list(tele.inference.models) == ["d:3"]
    assert tele.inference.models["d:3"].error_count() == 3
    assert tele.durability == Durability()
    event = documents.read_event(b'{"type": "model_failed", "stage": 3, "message": "m", "x": 1}')
    assert event == Event(type="model_failed", message="m")
    assert documents.read_event(b'{"ts": "no type"}') is None


def test_an_event_is_built_as_the_agent_always_built_it() -> None:
    fields: dict[str, Any] = {
        "model": "digits", "version": "3", "runtime": "onnxruntime", "device": "CPU",
        "fallbacks": ["openvino/CPU: no"], "latency_ms": None, "precision": "f32",
        "autotune": None, "bytes": 9, "not_in_the_contract": [1]}
    event, extra = documents.event("model_serving", "2026-01-01T00:00:00Z", "gw-1", fields)
    old = {"ts": "2026-01-01T00:00:00Z", "type": "model_serving", "device_id": "gw-1"}
    old.update({k: v for k, v in fields.items() if v is not None})
    assert json.loads(documents.encode_event(event, extra)) == old


def _old_hardware_summary(hw: HardwareInfo) -> dict[str, Any]:
    """HardwareInfo.summary() as the agent published it before the Structs."""
    return dict(hw.summary())


def test_the_agents_state_and_reported_are_the_dicts_it_used_to_build(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text(f"device_id: gw-1\nstate_dir: {tmp_path / 'state'}\n")
    hw = HardwareInfo(cpu_model="x", cores_physical=2, cores_logical=4, cpu_flags=("avx2", "q"),
                      memory_bytes=8 << 30, ort_providers=("CPUExecutionProvider",),
                      ort_version="1.20", openvino_devices=("CPU",),
                      openvino_device_names=(("CPU", "Intel"),), openvino_version="2025",
                      nvidia_gpus=(NvidiaGpu(0, "Orin", None),), errors=("runtime y: z",))
    agent = Agent(load_config(cfg_file), hardware=hw)
    try:
        state = json.loads(agent._state_payload("online"))
        assert state == {"state": "online", "agent_version": state["agent_version"],
                         "session_id": agent.session_id, "started_at": agent.started_at}
        reported = json.loads(documents.encode(agent.reported()))
        assert reported == {
            "device_id": "gw-1", "agent_version": state["agent_version"], "revision": None,
            "rollback": False, "models": [], "last_error": None,
            "hardware": _old_hardware_summary(hw), "updated_at": reported["updated_at"]}
        tele = json.loads(documents.encode(agent.telemetry.document()))
        assert set(tele) == {"ts", "health", "queue_depth", "inference", "durability"}
        assert set(tele["inference"]) == {"jobs_ok", "jobs_failed", "errors_by_code", "models",
                                          "shadows", "state_disk"}
        assert tele["inference"]["shadows"] == {}  # no shadow version (agent/shadow.py)
        assert tele["durability"] == msgspec.to_builtins(agent.durability())
        assert len(tele["durability"]) == 12
    finally:
        agent.journal.close()
