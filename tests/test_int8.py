"""INT8 at deploy, in-process: the manifest's quantize fields, the calibration set's checks,
ONNX Runtime's static quantization on the real digits and CNN models, and auto-tuning with
the int8 candidates (real ONNX Runtime and OpenVINO sessions)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from bench.models import DigitsModel, build_cnn
from edgeinfer.agent.int8 import calibration_arrays, prepare
from edgeinfer.contract.manifest import ManifestError, ModelSpec, decode_manifest
from edgeinfer.runtimes.autotune import autotune
from edgeinfer.runtimes.backends import get_backend
from edgeinfer.runtimes.base import LoadOptions
from edgeinfer.runtimes.hardware import HardwareInfo, detect
from edgeinfer.runtimes.quantize import (
    CalibrationError,
    Int8Plan,
    calibration_batches,
    check_calibration,
    is_classifier,
    judge,
    onnx_signature,
    quantize_int8,
)

SHA = "ab" * 32


def entry(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"name": "digits", "version": "1", "uri": "file:///m.onnx",
                         "sha256": SHA, "size": 1}
    m.update(over)
    return m


def decode(**over: Any) -> ModelSpec:
    return decode_manifest(json.dumps({"revision": 1, "models": [entry(**over)]}).encode()).models[0]


CAL_FILE = {"name": "cal.npz", "uri": "file:///cal.npz", "sha256": "cd" * 32, "size": 10}
HEALTH = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}


@pytest.mark.parametrize(("over", "needle"), [
    ({"quantize": "int4", "health": HEALTH},
     "key 'models[0].quantize': model digits:1: unknown quantize value 'int4' (known: int8)"),
    ({"quantize": "int8"}, "no calibration inputs: give health.inputs or quantize_calibration"),
    ({"quantize": "int8", "quantize_calibration": "other.npz", "files": [CAL_FILE]},
     "'models[0].quantize_calibration': model digits:1: 'other.npz' is not one of its files"),
    ({"quantize": "int8", "quantize_calibration": "cal.txt",
      "files": [{**CAL_FILE, "name": "cal.txt"}]}, "'cal.txt' is not an .npz file"),
    ({"quantize_calibration": "cal.npz", "files": [CAL_FILE]}, "but no quantize mode"),
    ({"quantize": "int8", "task": "ocr", "health": HEALTH}, "task ocr runs several models"),
    ({"quantize": "int8", "health": HEALTH, "quantize_min_agreement": 1.5}, "<= 1"),
])
def test_bad_quantize_fields_are_refused_by_name(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ManifestError) as err:
        decode(**over)
    assert needle in str(err.value)


def test_good_quantize_fields_decode() -> None:
    m = decode(quantize="int8", quantize_calibration="cal.npz", files=[CAL_FILE])
    assert (m.quantize, m.quantize_calibration, m.quantize_min_agreement) == (
        "int8", "cal.npz", 0.99)
    assert decode(quantize="int8", health=HEALTH).quantize_calibration is None
    assert decode().quantize is None


def test_calibration_that_does_not_fit_names_input_and_shapes(digits: DigitsModel) -> None:
    inputs, _ = onnx_signature(digits.path)
    x = digits.x_test
    assert check_calibration(inputs, {"x": x}, "cal") == len(x)
    cases = [
        ({"x": x.reshape(-1, 8, 8)}, "cal: input 'x' has shape [450, 8, 8], the model expects "
                                     "[-1, 64]"),
        ({"x": x.astype(np.float64)}, "cal: input 'x' is float64, the model expects FP32"),
        ({"image": x}, "missing input(s) x; unknown input(s) image; the model takes x"),
    ]
    scalar = [replace(inputs[0], shape=())]
    with pytest.raises(CalibrationError, match="input 'x' is a scalar or of unknown rank"):
        check_calibration(scalar, {"x": x}, "cal")
    for arrays, needle in cases:
        with pytest.raises(CalibrationError) as err:
            check_calibration(inputs, arrays, "cal")
        assert needle in str(err.value)


def test_a_calibration_file_is_read_and_checked(digits: DigitsModel, tmp_path: Path) -> None:
    np.savez(tmp_path / "cal.npz", x=digits.x_test.reshape(-1, 8, 8))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    spec = decode(quantize="int8", quantize_calibration="cal.npz", files=[CAL_FILE])
    with pytest.raises(CalibrationError, match=r"quantize_calibration cal.npz: input 'x' has "
                       r"shape \[450, 8, 8\], the model expects \[-1, 64\]"):
        prepare(spec, digits.path, tmp_path)
    bad = msgspec.structs.replace(spec, quantize_calibration="bad.npz")
    with pytest.raises(CalibrationError, match=r"bad\.npz cannot be read as an \.npz file"):
        calibration_arrays(bad, tmp_path)
    assert not list(tmp_path.glob("model.int8-*"))  # nothing quantized


def test_digits_quantized_once_agrees_on_top1(digits: DigitsModel, tmp_path: Path) -> None:
    np.savez(tmp_path / "cal.npz", x=digits.x_test)
    spec = decode(quantize="int8", quantize_calibration="cal.npz", files=[CAL_FILE])
    plan = prepare(spec, digits.path, tmp_path)
    assert plan is not None and plan.path is not None and plan.error == ""
    assert plan.classifier  # label INT64 [N] and probabilities FP32 [N, 10]
    assert len(plan.batches) == 8  # 450 rows, 64 a batch
    made = plan.path.stat().st_mtime_ns
    again = prepare(spec, digits.path, tmp_path)  # a restart: the same file, not quantized again
    assert again is not None and (again.path, again.key) == (plan.path, plan.key)
    assert plan.path.stat().st_mtime_ns == made
    assert quantize_int8(digits.path, plan.path, plan.batches) is False
    cpu = get_backend("onnxruntime")
    ref, q = (cpu.load(p, "CPU", LoadOptions()) for p in (digits.path, plan.path))
    try:
        share, why = judge(ref, q, plan)
        assert why is None and share >= 0.99
        # The rule, on the same sessions: labels compared row by row make the top-1
        # agreement; a reference that answers otherwise on every row is refused.
        flipped = replace(plan, batches=[{"x": b["x"][::-1].copy()} for b in plan.batches])
        share_flipped, _ = judge(ref, q, flipped)
        assert share_flipped >= 0.99  # the rows are the model's; their order does not matter
    finally:
        ref.close()
        q.close()


def test_a_non_classifier_is_judged_within_tolerance(tmp_path: Path) -> None:
    path = build_cnn(tmp_path, size=16)
    inputs, outputs = onnx_signature(path)
    assert not is_classifier("tensor", [replace(outputs[0], shape=(-1, 10, 2))])
    x = np.random.default_rng(3).random((32, 3, 16, 16), dtype=np.float32)
    batches = calibration_batches(inputs, {"image": x}, check_calibration(inputs, {"image": x}, "c"))
    dst = tmp_path / "cnn.int8.onnx"
    assert quantize_int8(path, dst, batches)
    cpu = get_backend("onnxruntime")
    ref, q = (cpu.load(p, "CPU", LoadOptions()) for p in (path, dst))
    try:
        tight = Int8Plan(dst, batches, False, 0.99, rtol=1e-6, atol=1e-7, key="k")
        share, why = judge(ref, q, tight)
        assert why is not None and "beyond rtol=1e-06, atol=1e-07" in why and share < 1.0
        loose = replace(tight, rtol=0.5, atol=0.5)
        assert judge(ref, q, loose) == (1.0, None)
    finally:
        ref.close()
        q.close()


@pytest.fixture(scope="module")
def hw() -> HardwareInfo:
    return replace(detect(), nvidia_gpus=())


def test_autotune_tries_int8_and_reports_agreement(
    digits: DigitsModel, hw: HardwareInfo, tmp_path: Path
) -> None:
    np.savez(tmp_path / "cal.npz", x=digits.x_test)
    spec = decode(quantize="int8", quantize_calibration="cal.npz", files=[CAL_FILE])
    plan = prepare(spec, digits.path, tmp_path)
    assert plan is not None
    tuned = autotune(digits.path, hw, LoadOptions(), sha256=SHA, budget_s=10.0, int8=plan)
    reports = {f"{r.runtime}/{r.device}/{r.precision}": r for r in tuned.candidates}
    mine = reports["onnxruntime/CPU/int8"]
    assert mine.ok and mine.agrees and mine.agreement is not None and mine.agreement >= 0.99
    assert mine.p50_ms is not None and mine.p50_ms > 0
    # OpenVINO cannot convert digits' ai.onnx.ml ops, quantized or not.
    assert "ArrayFeatureExtractor" in reports["openvino/CPU/int8"].reason
    tuned.session.close()
    # Judged as a non-classifier within a tolerance int8 cannot keep, it is refused with
    # the figures, and f32 serves.
    strict = replace(plan, classifier=False, rtol=1e-7, atol=1e-9)
    again = autotune(digits.path, hw, LoadOptions(), sha256=SHA, budget_s=10.0, int8=strict)
    r = {f"{c.runtime}/{c.device}/{c.precision}": c for c in again.candidates}["onnxruntime/CPU/int8"]
    assert r.agrees is False and r.agreement is not None and r.agreement < 1.0
    assert "disagrees with the reference onnxruntime/CPU/f32" in r.reason
    assert "beyond rtol=1e-07" in r.reason and r.p50_ms is None
    assert again.choice.precision == "f32"
    again.session.close()


def test_a_failed_quantizer_costs_only_the_int8_candidates(
    digits: DigitsModel, hw: HardwareInfo, tmp_path: Path
) -> None:
    plan = Int8Plan(None, [], True, 0.99, 1e-3, 1e-5, key="k", error="int8: quantizing failed: X")
    tuned = autotune(digits.path, hw, LoadOptions(), sha256=SHA, budget_s=5.0, int8=plan)
    reports = [r for r in tuned.candidates if r.precision == "int8"]
    assert reports and all(not r.ok and "quantizing failed: X" in r.reason for r in reports)
    f32 = [r for r in tuned.candidates if r.precision == "f32" and r.runtime == "openvino"]
    assert f32 and all("quantizing failed" not in r.reason for r in f32)
    assert tuned.choice.precision == "f32"
    tuned.session.close()
