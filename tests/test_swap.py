"""The registry's swap, step by step: a job that started on v1 finishes on v1, and v1 is
closed only after it; a job that starts after the swap gets v2 (the end-to-end hot-swap test
in test_deploy_atomic.py shows the same under load)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.contract.manifest import ModelSpec


class FakeSession:
    runtime = "fake"
    device = "CPU"
    inputs: list[Any] = []
    outputs: list[Any] = []

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.closed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def infer(self, inputs: Mapping[str, np.ndarray[Any, Any]],
              outputs: Sequence[str] | None = None) -> dict[str, np.ndarray[Any, Any]]:
        assert not self.closed.is_set(), "inference on a closed session"
        self.entered.set()
        assert self.release.wait(10)
        assert not self.closed.is_set(), "closed under a running job"
        return {"y": inputs["x"] * self.factor}

    def close(self) -> None:
        self.closed.set()


def serving(version: str, session: FakeSession) -> ServingModel:
    spec = msgspec.convert({"name": "m", "version": version, "uri": "file:///m",
                            "sha256": "ab" * 32, "size": 1}, ModelSpec)
    return ServingModel(spec, session, [])


def test_a_job_in_flight_finishes_on_the_version_it_started_on() -> None:
    registry = ServedModels()
    s1, s2 = FakeSession(1.0), FakeSession(2.0)
    registry.replace([serving("1", s1)])
    x = np.ones(3, np.float32)
    result: dict[str, Any] = {}

    def job() -> None:
        with registry.use("m", None) as model:
            result["version"] = model.spec.version
            result["y"] = model.session.infer({"x": x})["y"]

    t = threading.Thread(target=job)
    t.start()
    assert s1.entered.wait(10)  # the job runs on v1 ...
    dropped = registry.replace([serving("2", s2)])  # ... when v2 is swapped in
    assert [m.spec.version for m in dropped] == ["1"]
    assert not s1.closed.is_set()  # retired, not closed: a job still holds it
    s2.release.set()
    with registry.use("m", None) as model:  # a new job gets v2 at once
        assert model.spec.version == "2"
        np.testing.assert_array_equal(model.session.infer({"x": x})["y"], x * 2)
    s1.release.set()
    t.join(10)
    assert result["version"] == "1"
    np.testing.assert_array_equal(result["y"], x)
    assert s1.closed.is_set()  # closed once its last job finished
    assert not s2.closed.is_set()
