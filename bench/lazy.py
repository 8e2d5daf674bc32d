"""`python -m bench --only lazy`: a lazy model's first job (load + answer) beside a loaded
model's job, through a real mosquitto and edge-agent (agent/model_cache.py).

Two lazy versions of one model that is mostly weights (bench.models.build_weighty, 2048
wide: 16 MB of weights) and an eager one of the same file, with `models.memory_budget_mb`
fitting the eager one and one lazy one: jobs alternating between the two lazy ones each
find their model unloaded (the other one took its place), so each is a first job: load,
warm-up, answer. The eager one's jobs are the loaded baseline. Round trip at the client,
one job at a time; the agent's own load time from its `model_loaded` events.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.agent_steps import start_until_online
from bench.models import build_weighty
from edgeinfer.contract.manifest import Manifest, ModelSpec
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.deploy import publish_desired
from edgeinfer.fleet.localbroker import Broker
from edgeinfer.fleet.mqtt import connect, read_retained
from tests.agentproc import AgentProcess

PREFIX = "edge/v1"
DEVICE = "bench-lazy"
WIDTH = 2048


def _spec(path: Path, name: str, load: str) -> ModelSpec:
    data = path.read_bytes()
    return msgspec.convert({"name": name, "version": "1", "uri": path.as_uri(),
                            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                            "load": load, "runtime": {"prefer": ["onnxruntime"]}}, ModelSpec)


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def run(work: Path, say: Callable[[str], None], rounds: int = 10) -> dict[str, Any]:
    model = build_weighty(work / "models", "weighty.onnx", WIDTH, 7)
    broker = Broker(work / "broker")
    broker.start()
    agent: AgentProcess | None = None
    conn = connect(broker.url)
    try:
        topics = Topics(PREFIX, DEVICE)
        events: list[dict[str, Any]] = []
        lock = threading.Lock()

        def on_event(msg: Any) -> None:
            with lock:
                events.append(json.loads(msg.payload))

        conn.subscribe(topics.events, on_event)
        # Measured at deploy: ~17 MB each; the budget fits two of the three (the eager
        # one and one lazy), never both lazy ones.
        agent = AgentProcess(work / "agent", broker.url, device_id=DEVICE,
                             log={"level": "INFO"}, telemetry={"interval_s": 30.0},
                             models={"memory_budget_mb": 45})
        start_until_online(conn, agent)
        manifest = Manifest(revision=1, models=[
            _spec(model.path, "eager", "eager"), _spec(model.path, "lazy1", "lazy"),
            _spec(model.path, "lazy2", "lazy")])
        publish_desired(conn, topics, manifest)
        deadline = time.monotonic() + 120
        while not any(e.get("type") == "deploy_finished" for e in list(events)):
            assert time.monotonic() < deadline, "deploy did not finish"
            time.sleep(0.05)
        got = read_retained(broker.url, [topics.reported], quiet_s=0.2, timeout_s=5)
        memory = {m["name"]: m.get("memory_mb")
                  for payload in got.values() for m in json.loads(payload)["models"]}
        x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
        timings: dict[str, list[float]] = {"cold": [], "loaded": []}
        with InferenceClient(broker.url, client_id="bench-lazy-client") as client:
            for name in ("eager", "eager"):  # warm the path
                client.infer(name, {"x": x}, device=DEVICE, timeout=30, binary=True)
            for i in range(rounds):
                for name, kind in ((f"lazy{1 + i % 2}", "cold"), ("eager", "loaded")):
                    t0 = time.perf_counter()
                    result = client.infer(name, {"x": x}, device=DEVICE, timeout=30,
                                          binary=True)
                    timings[kind].append((time.perf_counter() - t0) * 1000.0)
                    np.testing.assert_allclose(result.outputs["y"], model.expected(x),
                                               rtol=2e-3, atol=2e-3)
        time.sleep(0.3)
        with lock:
            loads = [e["load_ms"] for e in events if e.get("type") == "model_loaded"]
            evicted = sum(1 for e in events if e.get("type") == "model_evicted")
        cold, loaded = _pct(timings["cold"], 50), _pct(timings["loaded"], 50)
        load_p50 = _pct(loads, 50) if loads else None
        out: dict[str, Any] = {
            "model": f"weighty {WIDTH}x{WIDTH} ({model.path.stat().st_size} bytes)",
            "runtime": "onnxruntime/CPU", "budget_mb": 45, "rounds": rounds,
            "memory_mb": memory.get("lazy1"),
            "cold_ms": {"p50": _pct(timings["cold"], 50), "p90": _pct(timings["cold"], 90)},
            "loaded_ms": {"p50": _pct(timings["loaded"], 50),
                          "p90": _pct(timings["loaded"], 90)},
            "agent_load_ms": {"p50": _pct(loads, 50), "p90": _pct(loads, 90)} if loads else {},
            "loads": len(loads), "evictions": evicted,
        }
        say(f"lazy: first job p50 {cold} ms (agent load p50 {load_p50} ms) vs loaded p50 "
            f"{loaded} ms")
        return out
    finally:
        conn.close()
        if agent is not None:
            agent.stop()
        broker.stop()


def markdown_section(lazy: dict[str, Any] | None) -> list[str]:
    if not lazy:
        return []
    if "error" in lazy:
        return ["## Lazy models: first job (load + answer)", "", f"Failed: {lazy['error']}", ""]
    rows = [("lazy model, unloaded (first job: load + warm-up + answer)", lazy["cold_ms"]),
            ("loaded model (eager)", lazy["loaded_ms"]),
            ("the agent's load alone (`model_loaded.load_ms`)", lazy.get("agent_load_ms") or {})]
    alone = (f"Measured alone (`python -m bench --only lazy`) at {lazy['measured_at']}, "
             f"commit {lazy.get('git')}: not in the same run as the sections above. "
             if "measured_at" in lazy else "")
    md = ["## Lazy models: first job (load + answer)", "",
          f"{alone}One job at a time through mosquitto and the agent, {lazy['rounds']} of each; "
          f"model {lazy['model']} on {lazy['runtime']}, {lazy['memory_mb']} MB measured at "
          f"deploy; `models.memory_budget_mb: {lazy['budget_mb']}` fits the eager copy and one "
          "lazy copy, so jobs alternating between two lazy copies each find theirs unloaded "
          f"({lazy['loads']} loads, {lazy['evictions']} unloads).", "",
          "| job | p50 ms | p90 ms |", "| --- | --- | --- |"]
    md += [f"| {what} | {t.get('p50', '-')} | {t.get('p90', '-')} |" for what, t in rows]
    md.append("")
    return md
