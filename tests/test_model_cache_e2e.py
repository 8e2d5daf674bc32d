"""Lazy models under a memory budget, end to end: a real mosquitto, a real agent process,
three real ONNX models that are mostly weights (bench/models.py `build_weighty`), the
agent's own RSS read from outside with psutil.

`a` is small and pinned, `b` and `c` are large; the budget (derived from the figures the
agent measured) fits `a` beside either large one but never `b` beside `c`, so jobs that
alternate between them make the cache unload one for the other. A version too large for
the budget alone is refused at deploy; a manifest with an unknown `load` is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from bench.models import WeightyModel, build_weighty
from edgeinfer.contract.manifest import Manifest
from edgeinfer.fleet.client import InferenceClient
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.deploydevice import Device, publish, publish_raw, spec
from tests.helpers import Watch

IDLE_S = 1.5


@pytest.fixture(scope="module")
def weighty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, WeightyModel]:
    d = tmp_path_factory.mktemp("weighty")
    # ~4 MB, ~16 MB, ~16 MB and ~36 MB of weights; the agent measures what they take.
    return {"a": build_weighty(d, "a.onnx", 1024, 1), "b": build_weighty(d, "b.onnx", 2048, 2),
            "c": build_weighty(d, "c.onnx", 2048, 3), "huge": build_weighty(d, "h.onnx", 3072, 4)}


def _manifest(revision: int, models: dict[str, WeightyModel], **c: Any) -> Manifest:
    def entry(name: str, **over: Any) -> Any:
        return spec(models[name].path, "1", name=name, load="lazy",
                    runtime={"prefer": ["onnxruntime"]}, **over)

    return Manifest(revision=revision, models=[entry("a", pin=True), entry("b"),
                                               c.get("c") or entry("c")])


def _models(rep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in rep["models"] if m["version"] == "1"}


def _all_unloaded(rep: dict[str, Any]) -> bool:
    got = _models(rep)
    return len(got) == 3 and all(m.get("state") == "serving" and m.get("loaded") is False
                                 and m.get("memory_mb", 0) > 0 for m in got.values())


def _answer(client: InferenceClient, device: str, name: str, model: WeightyModel,
            version: str = "1") -> None:
    x = np.random.default_rng(len(name)).standard_normal((1, model.w.shape[0])).astype(np.float32)
    result = client.infer(name, {"x": x}, device=device, timeout=30, binary=True)
    assert result.model_version == version, result.raw
    np.testing.assert_allclose(result.outputs["y"], model.expected(x), rtol=2e-3, atol=2e-3)


def _report_after(reports: Watch, mark: int, pred: Callable[[dict[str, Any]], bool],
                  timeout: float) -> dict[str, Any]:
    """The first `reported` after the first `mark` ones for which `pred` holds."""
    deadline = time.monotonic() + timeout
    while True:
        for rep in reports.snapshot()[mark:]:
            if pred(rep):
                return rep
        assert time.monotonic() < deadline, reports.snapshot()[mark:][-1:]
        time.sleep(0.05)


def _sample_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    proc = psutil.Process(pid)
    while not stop.wait(0.02):
        out.append(proc.memory_info().rss / (1024 * 1024))


def test_lazy_models_share_a_budget_in_a_real_agent(
    module_broker: Broker, module_client: InferenceClient, weighty: dict[str, WeightyModel],
    tmp_path: Path,
) -> None:
    dev = Device(tmp_path, module_broker, "gw-cache")
    reports = Watch(module_broker.url, dev.topics.reported)
    dev.start()
    try:
        # 1. No budget: each lazy version is measured and gated at deploy, then unloaded.
        publish(dev, _manifest(1, weighty))
        first = _models(reports.wait_for(_all_unloaded, timeout=60))
        mem = {name: float(m["memory_mb"]) for name, m in first.items()}
        big = max(mem["b"], mem["c"])
        # The premise: a pinned `a` fits beside either large one, which do not fit together.
        assert mem["a"] + big < mem["b"] + mem["c"], mem
        budget = round((mem["a"] + big + mem["b"] + mem["c"]) / 2, 1)

        # 2. Restarted with the budget: restored from the store, unloaded again.
        dev.agent.stop()
        dev.agent = AgentProcess(tmp_path / "agent", module_broker.url, dev.id,
                                 models={"memory_budget_mb": budget, "idle_unload_s": IDLE_S})
        mark = len(reports.snapshot())
        dev.start()
        restored = _models(_report_after(reports, mark, _all_unloaded, 60))
        mem = {name: float(m["memory_mb"]) for name, m in restored.items()}
        big = max(mem["b"], mem["c"])
        assert mem["a"] + big <= budget < mem["b"] + mem["c"], (mem, budget)
        assert dev.agent.proc is not None
        events_mark = dev.mark()
        mark = len(reports.snapshot())

        # 3. Jobs on all three, then a burst alternating b and c: every one answered.
        baseline = psutil.Process(dev.agent.proc.pid).memory_info().rss / (1024 * 1024)
        rss: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(dev.agent.proc.pid, stop, rss))
        sampler.start()
        try:
            for name in ("a", "b", "c", "b", "a", "c"):
                _answer(module_client, dev.id, name, weighty[name])
            errors: list[BaseException] = []

            def one(name: str) -> None:
                try:
                    _answer(module_client, dev.id, name, weighty[name])
                except BaseException as exc:  # told to the test's thread below
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(n,))
                       for n in ("b", "c", "b", "c", "a", "b")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            stop.set()
            sampler.join()
        assert not errors, errors
        settled = psutil.Process(dev.agent.proc.pid).memory_info().rss / (1024 * 1024)
        seen = reports.snapshot()[mark:]
        loaded_sets = [{n for n, m in _models(r).items() if m.get("loaded")} for r in seen]
        assert loaded_sets and all(len(s) <= 2 and not {"b", "c"} <= s for s in loaded_sets), \
            loaded_sets
        assert {"a", "b"} in loaded_sets and {"a", "c"} in loaded_sets, loaded_sets
        evicted = [e for e in dev.events.snapshot()[events_mark:] if e["type"] == "model_evicted"]
        assert [e for e in evicted if e["reason"] == "budget"], evicted
        assert all(e["model"] != "a" for e in evicted), evicted
        loads = [e for e in dev.events.snapshot()[events_mark:] if e["type"] == "model_loaded"]
        assert len(loads) >= 4 and all(e["load_ms"] > 0 for e in loads), loads
        # The bounds, over the agent with every model unloaded: the budget, plus what one
        # load holds while it runs (one at a time): the model file's bytes, its parse and a
        # pre-packed copy of its weights, given back at its end; plus 8 MB for the job
        # path's buffers and the threads. Once the jobs are done: the budget, plus one
        # model's worth that glibc may keep in a worker thread's heap. Sessions an unload
        # did not free would pass them within a few swaps between b and c.
        bound = baseline + budget + 3 * big + 8
        assert settled <= baseline + budget + big + 8, (settled, baseline, budget, big)
        assert max(rss) <= bound, (max(rss), bound, baseline, budget, big, rss[::10])

        # 4. Idle: b and c go after idle_unload_s; the pinned a stays.
        idle = _report_after(reports, mark, lambda r: {
            n: m.get("loaded") for n, m in _models(r).items()} == {
                "a": True, "b": False, "c": False}, IDLE_S * 4 + 5)
        assert _models(idle)["a"]["memory_mb"] == mem["a"]
        dev.event("model_evicted", after=events_mark, reason="idle")

        # 5. A version that cannot fit the budget even alone is refused; c:1 keeps serving.
        huge = spec(weighty["huge"].path, "2", name="c", load="lazy",
                    runtime={"prefer": ["onnxruntime"]})
        mark = dev.mark()
        publish(dev, _manifest(2, weighty, c=huge))
        failed = dev.event("model_failed", after=mark, model="c", version="2", stage="memory")
        assert f"models.memory_budget_mb={budget:g}" in failed["message"], failed
        assert "cannot be loaded even alone" in failed["message"], failed
        _answer(module_client, dev.id, "c", weighty["c"])

        # 6. An unknown `load` is refused, naming the key; what serves keeps serving.
        mark = dev.mark()
        publish_raw(dev, (
            b'{"revision": 3, "models": [{"name": "a", "version": "1", "uri": "'
            + weighty["a"].path.as_uri().encode() + b'", "sha256": "' + b"0" * 64
            + b'", "size": 1, "load": "sometimes"}]}'))
        rejected = dev.event("manifest_rejected", after=mark, revision=3)
        assert "'models[0].load': expected one of 'eager', 'lazy', got 'sometimes'" in \
            rejected["message"], rejected
        _answer(module_client, dev.id, "a", weighty["a"])
    finally:
        reports.close()
        dev.close()
