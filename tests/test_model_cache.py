"""The model cache's policy (agent/model_cache.py) with fake sessions at the session seam:
LRU among unpinned lazy versions, pins, jobs in flight, the budget's waits and refusals,
idle unloading; and the manifest's `load` and `pin`."""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec
import numpy as np
import pytest

from edgeinfer.agent.config import ModelsConfig
from edgeinfer.agent.model_cache import ModelCache
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.contract.manifest import ManifestError, ModelSpec, decode_manifest
from edgeinfer.runtimes.base import TensorSpec

SHA = "ab" * 32


class FakeSession:
    """The Session seam: what the cache and the workers touch."""

    runtime = "fake"
    device = "CPU"
    inputs = [TensorSpec("x", "FP32", (1, 1))]
    outputs = [TensorSpec("y", "FP32", (1, 1))]

    def __init__(self) -> None:
        self.closed = False

    def infer(self, inputs: Any, outputs: Any = None) -> dict[str, np.ndarray]:
        assert not self.closed
        return {"y": inputs["x"]}

    def close(self) -> None:
        self.closed = True


class World:
    """A registry of served versions and a cache over them; counts each version's loads."""

    def __init__(self, budget: float | None = None, idle: float | None = None) -> None:
        self.registry = ServedModels()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cache = ModelCache(self.registry,
                                ModelsConfig(memory_budget_mb=budget, idle_unload_s=idle),
                                lambda kind, **f: self.events.append((kind, f)), lambda: None)
        self.loads: dict[str, int] = {}
        self.load_s = 0.0

    def model(self, name: str, memory: float, *, lazy: bool = True,
              pin: bool = False) -> ServingModel:
        spec = msgspec.convert({"name": name, "version": "1", "uri": "file:///m.onnx",
                                "sha256": SHA, "size": 1, "pin": pin,
                                "load": "lazy" if lazy else "eager"}, ModelSpec)
        m = ServingModel(spec, FakeSession(), [])
        m.memory_mb = memory
        if lazy:
            def reload() -> Any:
                time.sleep(self.load_s)
                self.loads[name] = self.loads.get(name, 0) + 1
                return FakeSession()

            m.lazy = self.cache.lazy(reload, pin)
            assert m.detach() is not None  # gated at deploy, then unloaded
        return m

    def serve(self, *models: ServingModel) -> None:
        self.registry.replace(models)

    def job(self, name: str, deadline_s: float | None = 5.0) -> None:
        """One job on `name`, start to end."""
        m = self.registry.acquire(name, None)
        try:
            assert m.lazy is not None
            m.lazy.ensure(m, None if deadline_s is None else time.monotonic() + deadline_s)
            assert m.loaded
            out = m.session.infer({"x": np.ones((1, 1), np.float32)})
            assert out["y"].shape == (1, 1)
        finally:
            m.release()

    def loaded(self) -> set[str]:
        return {m.spec.name for m in self.registry.snapshot() if m.loaded}

    def evicted(self) -> list[tuple[str, str]]:
        return [(f["model"], f["reason"]) for kind, f in self.events if kind == "model_evicted"]


pytestmark = pytest.mark.unit


def test_a_lazy_version_loads_on_its_first_job_and_the_lru_one_makes_room() -> None:
    w = World(budget=25)
    a, b, c = w.model("a", 10), w.model("b", 10), w.model("c", 10)
    w.serve(a, b, c)
    assert w.loaded() == set()
    w.job("a")
    w.job("b")
    assert w.loaded() == {"a", "b"}
    w.job("a")  # b is now the least recently used
    w.job("c")
    assert w.loaded() == {"a", "c"}
    assert w.evicted() == [("b", "budget")]
    w.job("b")  # a is the least recently used now
    assert w.loaded() == {"c", "b"}
    assert w.loads == {"a": 1, "b": 2, "c": 1}
    assert isinstance(b.session, FakeSession) and not b.session.closed


def test_a_pinned_version_is_never_unloaded() -> None:
    w = World(budget=25, idle=0.01)
    a, b, c = w.model("a", 10, pin=True), w.model("b", 10), w.model("c", 10)
    w.serve(a, b, c)
    for name in ("a", "b", "c", "b", "c"):
        w.job(name)
    assert "a" in w.loaded() and len(w.loaded()) == 2
    assert all(name != "a" for name, _ in w.evicted())
    unloaded = w.cache.unload_idle(now=time.monotonic() + 1)
    assert [m.spec.name for m in unloaded] == ["c"]
    assert w.loaded() == {"a"}
    assert w.evicted()[-1] == ("c", "idle")


def test_a_version_with_a_job_in_flight_is_never_unloaded() -> None:
    w = World(budget=25)
    a, b, c = w.model("a", 10), w.model("b", 10), w.model("c", 10)
    w.serve(a, b, c)
    w.job("a")
    w.job("b")
    held = w.registry.acquire("a", None)  # a: the LRU one, but a job holds it
    try:
        w.job("c")
        assert w.loaded() == {"a", "c"}
        assert w.evicted() == [("b", "budget")]
        assert w.cache.unload_idle(now=time.monotonic() + 99) == []  # no idle_unload_s
    finally:
        held.release()


def test_a_job_waits_for_room_until_its_deadline_and_loads_once_there_is() -> None:
    w = World(budget=15)
    a, b = w.model("a", 10), w.model("b", 10)
    w.serve(a, b)
    w.job("a")
    held = w.registry.acquire("a", None)
    started = time.monotonic()
    with pytest.raises(JobError) as info:
        w.job("b", deadline_s=0.2)  # a is held for longer than b's deadline
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert 0.2 <= time.monotonic() - started < 1.0
    assert w.loaded() == {"a"}
    threading.Timer(0.1, held.release).start()
    w.job("b", deadline_s=5)  # a is let go meanwhile: unloaded, b loaded
    assert w.loaded() == {"b"}


def test_one_load_at_a_time_and_a_second_job_waits_for_it() -> None:
    w = World()
    w.load_s = 0.2
    w.serve(w.model("a", 10))
    jobs = [threading.Thread(target=w.job, args=("a",)) for _ in range(4)]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(5)
    assert w.loads == {"a": 1}


def test_a_version_that_can_never_fit_beside_the_eager_ones_is_told_so_at_once() -> None:
    w = World(budget=25)
    w.serve(w.model("e", 20, lazy=False), w.model("a", 10))
    with pytest.raises(JobError) as info:
        w.job("a", deadline_s=None)  # no deadline: it must not wait forever
    assert info.value.code is Code.RESOURCE_EXHAUSTED
    assert "a:1 needs 10.0 MB" in info.value.message and "20.0 MB" in info.value.message
    assert "models.memory_budget_mb=25" in info.value.message


def test_an_unloaded_version_still_describes_its_tensors() -> None:
    w = World()
    m = w.model("a", 10, lazy=False)
    m.tensors()  # reported at deploy, while loaded
    m.lazy = w.cache.lazy(FakeSession, False)
    assert m.detach() is not None and not m.loaded
    assert [t.name for t in m.tensors()[0]] == ["x"]


def _manifest(**fields: Any) -> bytes:
    return msgspec.json.encode({"revision": 1, "models": [
        {"name": "m", "version": "1", "uri": "file:///m.onnx", "sha256": SHA, "size": 1,
         **fields}]})


def test_the_manifest_takes_load_and_pin_and_names_a_bad_load() -> None:
    spec = decode_manifest(_manifest(load="lazy", pin=True)).models[0]
    assert (spec.load, spec.pin) == ("lazy", True)
    assert decode_manifest(_manifest()).models[0].load == "eager"
    with pytest.raises(ManifestError) as info:
        decode_manifest(_manifest(load="sometimes"))
    assert "'models[0].load': expected one of 'eager', 'lazy', got 'sometimes'" in str(info.value)
    with pytest.raises(ManifestError, match=r"models\[0\]\.load.*task ocr"):
        decode_manifest(_manifest(load="lazy", task="ocr"))
