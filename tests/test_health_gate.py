"""The health gate on real ONNX Runtime sessions, and the manifest's `health` field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import build_nan, build_scaled
from edgeinfer.agent import health_gate as health
from edgeinfer.contract.manifest import Health, ManifestError, decode_manifest
from edgeinfer.runtimes.base import LoadOptions
from edgeinfer.runtimes.hardware import detect
from edgeinfer.runtimes.selection import NoRuntimeError, load_first_workable

X = np.arange(64, dtype=np.float32).reshape(1, 64) / 64


def tensor(name: str, arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": list(arr.shape), "data": arr.ravel().tolist()}


def gate(**fields: Any) -> Health:
    doc = json.dumps({"revision": 1, "models": [{
        "name": "m", "version": "1", "uri": "file:///m", "sha256": "ab" * 32, "size": 1,
        "health": fields}]}).encode()
    spec_health = decode_manifest(doc).models[0].health
    assert spec_health is not None
    return spec_health


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("health")
    return {"double": build_scaled(d, 2.0), "nan": build_nan(d),
            "slow": build_scaled(d, 1.0, "slow.onnx", busy_layers=8, busy_rows=512)}


def load(path: Path, h: Health | None) -> Any:
    return load_first_workable(path, ["onnxruntime"], detect(), LoadOptions(),
                               sample_inputs=health.sample_inputs(h)).session


def test_expected_outputs_pass_and_fail(models: dict[str, Path]) -> None:
    good = gate(inputs=[tensor("x", X)], expected=[tensor("y", X * 2)])
    session = load(models["double"], good)
    assert health.check(session, good).latency_ms is None
    off = gate(inputs=[tensor("x", X)], expected=[tensor("y", X * 2 + 0.01)], rtol=0, atol=1e-3)
    with pytest.raises(health.HealthError, match=r"differs from health.expected: 64 of 64"):
        health.check(session, off)
    loose = gate(inputs=[tensor("x", X)], expected=[tensor("y", X * 2 + 0.01)], atol=0.02)
    health.check(session, loose)
    wrong_name = gate(inputs=[tensor("x", X)], expected=[tensor("z", X)])
    with pytest.raises(health.HealthError, match="names output 'z'; the model gives y"):
        health.check(session, wrong_name)
    bad_input = gate(inputs=[tensor("x", np.zeros((1, 3), np.float32))])
    with pytest.raises(health.HealthError, match="do not fit the model"):
        health.check(session, bad_input)


def test_nan_outputs_are_refused_even_without_a_health_field(models: dict[str, Path]) -> None:
    session = load(models["nan"], None)
    with pytest.raises(health.HealthError, match=r"'y' has 64 NaN and 0 infinite value\(s\) of 64"):
        health.check(session, None)


def test_latency_budget(models: dict[str, Path]) -> None:
    session = load(models["slow"], None)
    ok = health.check(session, gate(max_latency_ms=60_000))
    assert ok.latency_ms is not None and ok.latency_ms > 0
    with pytest.raises(health.HealthError, match=r"over health.max_latency_ms 0.01"):
        health.check(session, gate(max_latency_ms=0.01))
    # Restoring after a restart does not measure again.
    assert health.check(session, gate(max_latency_ms=0.01), check_latency=False).latency_ms is None


def test_a_gate_refusal_falls_back_to_the_next_runtime(models: dict[str, Path]) -> None:
    seen: list[str] = []

    def refuse_openvino(session: Any, feed: Any, outputs: Any) -> None:
        seen.append(session.runtime)
        if session.runtime == "openvino":
            raise health.HealthError("pretend FP16 overflow")

    loaded = load_first_workable(models["double"], ["openvino", "onnxruntime"], detect(),
                                 check=refuse_openvino)
    assert loaded.session.runtime == "onnxruntime"
    assert seen == ["openvino", "onnxruntime"]
    assert "pretend FP16 overflow" in loaded.attempts[0].reason
    with pytest.raises(NoRuntimeError, match="pretend"):
        load_first_workable(models["double"], ["openvino"], detect(), check=refuse_openvino)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"expected": [tensor("y", X)]}, "health.expected needs health.inputs"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]},
         r"shape \[1, 3\] needs 3 values, data has 2"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]},
         "unknown datatype 'FLOAT'"),
        ({"inputs": [tensor("x", X), tensor("x", X)]}, "given twice"),
        ({"max_latency_ms": 0}, r"key 'models\[0\]\.health\.max_latency_ms': expected a number > 0"),
        ({"rtol": 0.1, "tolerance": 1}, r"key 'models\[0\]\.health\.tolerance': unknown key"),
    ],
)
def test_manifest_health_is_checked_when_decoded(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ManifestError, match=needle):
        gate(**fields)


def test_nested_data_and_integer_outputs_compare_exactly() -> None:
    h = gate(inputs=[{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}])
    arrays = health.sample_inputs(h)
    assert arrays is not None
    np.testing.assert_array_equal(arrays["x"], np.array([[1, 2], [3, 4]], np.int64))
