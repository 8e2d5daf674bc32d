"""Shadow versions in process (agent/shadow.py): how agreement is judged, and the lane that
runs copies on real ONNX Runtime sessions of y = x (serving) and y = 2x (shadow), with its
bounded backlog, its drops and its errors counted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from bench.models import build_scaled
from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.agent.shadow import ALLCLOSE, TOP1, Copy, ShadowLane, agree, with_shadow_stats
from edgeinfer.contract.documents import ModelEntry
from edgeinfer.contract.manifest import ModelSpec
from edgeinfer.runtimes.base import LoadOptions
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND

X = (np.arange(64, dtype=np.float32).reshape(1, 64) - 32) / 8
ZERO = np.zeros((1, 64), np.float32)


def _spec(version: str, **extra: Any) -> ModelSpec:
    return msgspec.convert({"name": "m", "version": version, "uri": "file:///m",
                            "sha256": "ab" * 32, "size": 1, **extra}, ModelSpec)


@pytest.fixture(scope="module")
def models(model_dir: Path) -> tuple[Path, Path]:
    return build_scaled(model_dir, 1.0, "one.onnx"), build_scaled(model_dir, 2.0, "two.onnx")


@pytest.fixture
def served(models: tuple[Path, Path]) -> Iterator[ServedModels]:
    """m:1 (y = x) serving, m:2 (y = 2x) its shadow, on real sessions."""
    registry = ServedModels()
    one, two = (BACKEND.load(p, "CPU", LoadOptions()) for p in models)
    registry.replace([ServingModel(_spec("1"), one, []),
                      ServingModel(_spec("2", shadow=True), two, [])])
    yield registry
    registry.close_all()


def _copy(x: np.ndarray, answered: np.ndarray, serving_ms: float = 1.0) -> Copy:
    return Copy("m", "2", {"x": x}, None, {"y": answered}, serving_ms)


def test_agreement_is_allclose_by_the_tolerances_else_top1_for_classification() -> None:
    y = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    assert agree(ALLCLOSE, {"y": y}, {"y": y + 5e-6}, 1e-3, 1e-5)
    assert not agree(ALLCLOSE, {"y": y}, {"y": y * 2}, 1e-3, 1e-5)
    assert agree(ALLCLOSE, {"y": y}, {"y": y * 2}, 1.0, 0.0)  # the shadow's own tolerances
    assert not agree(ALLCLOSE, {"y": y}, {"y": y[:1]}, 1e-3, 1e-5)  # another shape
    assert not agree(ALLCLOSE, {"y": y}, {"z": y}, 1e-3, 1e-5)  # other outputs
    ids = np.array([[3, 1]], np.int64)
    assert agree(ALLCLOSE, {"k": ids}, {"k": ids.copy()}, 1e-3, 1e-5)
    assert not agree(ALLCLOSE, {"k": ids}, {"k": ids + 1}, 1.0, 1.0)  # integers: equal
    # Classification: the same top-1 class per row, whatever the scores and the rest.
    a = {"classes": np.array([[7, 1], [2, 0]]), "scores": np.array([[0.9, 0.1], [0.6, 0.4]])}
    b = {"classes": np.array([[7, 0], [2, 1]]), "scores": np.array([[0.5, 0.4], [0.3, 0.2]])}
    assert agree(TOP1, a, b, 1e-3, 1e-5)
    assert not agree(TOP1, a, {"classes": np.array([[7, 1], [0, 2]])}, 1e-3, 1e-5)
    labels = {"labels": np.array([["cat", "dog"]], object)}
    assert agree(TOP1, labels, {"labels": np.array([["cat", "cow"]], object)}, 0, 0)
    assert agree(TOP1, {"scores": np.array([[0.1, 0.9]])}, {"scores": np.array([[0, 3.0]])}, 0, 0)
    assert not agree(TOP1, {"y": y}, {"y": y}, 1e-3, 1e-5)  # nothing to compare: no


def test_the_lane_compares_copies_on_the_shadow_and_reports_them(served: ServedModels) -> None:
    shadow = served.shadow_of("m")
    assert shadow is not None and shadow.label == "m:2"
    metrics = Metrics()
    lane = ShadowLane(served, metrics, backlog=8)
    one = served.find("m", "1")
    assert one is not None
    for x in (X, ZERO, X):  # 2x equals x only where x is 0
        lane.run(_copy(x, one.session.infer({"x": x})["y"], serving_ms=2.5))
    fig = metrics.shadow_figures()["m:2"]
    assert (fig["compared"], fig["agreed"], fig["agreement"]) == (3, 1, 0.3333)
    assert (fig["dropped"], fig["errors"], fig["compare"]) == (0, 0, ALLCLOSE)
    assert fig["serving_ms"]["p50"] == 2.5 and fig["shadow_ms"]["p95"] > 0
    # Telemetry's and reported's shape of them.
    inference = metrics.snapshot()
    assert inference["shadows"]["m:2"]["compared"] == 3
    entries = [ModelEntry("m", "1", state="serving", traffic=100),
               ModelEntry("m", "2", state="serving", shadow=True)]
    listed = with_shadow_stats(entries, metrics.shadow_figures())
    assert listed[0].shadow_stats is msgspec.UNSET
    stats = listed[1].shadow_stats
    assert not isinstance(stats, msgspec.UnsetType)
    assert (stats.compared, stats.agreed, stats.shadow_ms.p50 is not None) == (3, 1, True)


def test_a_full_backlog_drops_copies_and_counts_them(served: ServedModels) -> None:
    metrics = Metrics()
    lane = ShadowLane(served, metrics, backlog=2)  # not started: nothing takes copies
    for _ in range(5):
        lane.offer(_copy(X, X))
    assert metrics.shadow_figures()["m:2"]["dropped"] == 3
    lane.stop()  # the two waiting are dropped too: copies do not outlive the agent
    lane.offer(_copy(X, X))
    assert metrics.shadow_figures()["m:2"]["dropped"] == 6
    # By bytes too: a copy holds x and the answer's y, 2 x 256 bytes here.
    small = ShadowLane(served, metrics, backlog=10, backlog_bytes=1024)
    for _ in range(3):
        small.offer(_copy(X, X))
    assert metrics.shadow_figures()["m:2"]["dropped"] == 7
    small.stop()
    assert metrics.shadow_figures()["m:2"]["compared"] == 0


def test_a_failing_or_departed_shadow_is_counted_and_touches_nothing_else(
        served: ServedModels) -> None:
    metrics = Metrics()
    lane = ShadowLane(served, metrics, backlog=2)
    lane.run(Copy("m", "2", {"wrong": X}, None, {"y": X}, 1.0))  # the runtime raises
    assert metrics.shadow_figures()["m:2"]["errors"] == 1
    serving = served.find("m", "1")
    assert serving is not None
    served.replace([serving])  # the shadow undeployed: no name has one now
    assert served.shadow_of("m") is None
    lane.run(_copy(X, X))
    fig = metrics.shadow_figures()["m:2"]
    assert (fig["compared"], fig["errors"], fig["dropped"]) == (0, 1, 1)
    assert metrics.snapshot()["jobs_failed"] == 0  # never a job's error
