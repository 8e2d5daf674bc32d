"""Runtimes, for real: ONNX Runtime and OpenVINO on real models, selection and fallback.

Only the hardware is faked (a `HardwareInfo` passed in), to exercise the CUDA and GPU paths
on a machine without them.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.models import DigitsModel, build_cnn, build_digits, build_mlp, silero_vad_path
from edgeinfer.contract.datatypes import OIP_DATATYPES
from edgeinfer.runtimes import backends as registry
from edgeinfer.runtimes import datatypes
from edgeinfer.runtimes.base import Backend, LoadOptions, Session, TensorSpec, make_sample_inputs
from edgeinfer.runtimes.hardware import HardwareInfo, NvidiaGpu, detect
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.selection import (
    DEFAULT_PREFERENCE,
    Attempt,
    Candidate,
    NoRuntimeError,
    explain,
    load_first_workable,
    parse_preference,
    plan,
)

# OpenVINO's CPU plugin is held to f32 (see openvino_backend), so the two runtimes differ
# only by kernel summation order.
RTOL, ATOL = 1e-4, 1e-5

OPTS = LoadOptions(threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"mlp": build_mlp(d), "cnn": build_cnn(d), "digits": build_digits(d).path}


@pytest.fixture(scope="module")
def digits(models: dict[str, Path]) -> DigitsModel:
    return build_digits(models["digits"].parent)  # the cached one: no retraining


@pytest.fixture(scope="module")
def hw() -> HardwareInfo:
    return detect()


@pytest.fixture
def cpu_only(hw: HardwareInfo) -> HardwareInfo:
    """This machine as it is, minus any NVIDIA GPU: the scenario the tests describe."""
    return replace(hw, nvidia_gpus=())


@pytest.fixture
def fake_gpu(hw: HardwareInfo) -> HardwareInfo:
    """This machine claiming an NVIDIA GPU and an ORT build with the CUDA provider."""
    return replace(
        hw,
        nvidia_gpus=(NvidiaGpu(0, "Fake GPU", 8192),),
        ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    )


def _random_input(session: Session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = session.inputs[0]
    shape = tuple(batch if d < 0 else d for d in spec.shape)
    return {spec.name: rng.standard_normal(shape).astype(np.float32)}


# --- hardware -----------------------------------------------------------------------------


def test_detect_sees_this_machine(hw: HardwareInfo) -> None:
    assert hw.cores_logical >= 1
    assert 1 <= hw.cores_physical <= hw.cores_logical
    assert hw.memory_bytes > 0
    assert "CPU" in hw.openvino_devices
    assert hw.openvino_device_name("CPU")
    assert "CPUExecutionProvider" in hw.ort_providers
    assert not [e for e in hw.errors if e.startswith("runtime ")], hw.errors
    assert detect() is hw  # cached
    summary = hw.summary()
    json.dumps(summary)
    assert summary["openvino"]["devices"]["CPU"]
    assert len(summary["cpu"]["flags"]) <= 25  # only the flags that matter


def test_runtime_import_failure_is_reported_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.get_backend("openvino")  # cached before the block: later tests need the real one
    # sys.modules[name] = None makes `import name` raise ImportError.
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.delitem(sys.modules, "edgeinfer.runtimes.openvino_backend")
    backend = registry.import_backend("openvino")
    reason = backend.unavailable_reason(HardwareInfo())
    assert reason is not None
    assert reason.startswith("runtime openvino unavailable: ModuleNotFoundError")
    assert backend.devices(HardwareInfo()) == []

    fresh = detect(refresh=True)
    try:
        assert fresh.openvino_devices == ()
        assert fresh.runtime_error("openvino") is not None
        assert OPENVINO.unavailable_reason(fresh) == fresh.runtime_error("openvino")
        _, skipped = plan(["openvino"], fresh)
        assert skipped[0].reason.startswith("runtime openvino unavailable")
    finally:
        monkeypatch.undo()
        detect(refresh=True)


# --- datatypes and sample inputs ----------------------------------------------------------


def test_datatypes_round_trip() -> None:
    for name in OIP_DATATYPES:  # every datatype of the contract has its numpy counterpart
        assert datatypes.from_numpy_dtype(datatypes.to_numpy_dtype(name)) == name
    assert datatypes.to_numpy_dtype("BYTES") == np.dtype(object)
    assert datatypes.from_numpy_dtype(np.dtype("U5")) == "BYTES"
    assert datatypes.from_onnx_type("tensor(float)") == "FP32"
    assert datatypes.from_onnx_type("tensor(int64)") == "INT64"
    assert datatypes.from_onnx_type("tensor(string)") == "BYTES"
    assert datatypes.from_openvino_type("f32") == "FP32"
    assert datatypes.from_openvino_type("boolean") == "BOOL"
    with pytest.raises(ValueError, match="FP32"):
        datatypes.to_numpy_dtype("FLOAT")
    with pytest.raises(ValueError, match="not a tensor"):
        datatypes.from_onnx_type("seq(map(int64,tensor(float)))")
    with pytest.raises(ValueError):
        datatypes.from_numpy_dtype(np.complex64)


def test_make_sample_inputs() -> None:
    specs = [
        TensorSpec("x", "FP32", (-1, 3, -1)),
        TensorSpec("ids", "INT64", (2, -1)),
        TensorSpec("sr", "INT64", ()),
        TensorSpec("mask", "BOOL", (-1,)),
        TensorSpec("text", "BYTES", (-1,)),
    ]
    out = make_sample_inputs(specs, batch=4)
    assert out["x"].shape == (4, 3, 1) and out["x"].dtype == np.float32
    assert out["ids"].shape == (2, 1) and out["ids"].dtype == np.int64
    assert isinstance(out["sr"], np.ndarray) and out["sr"].shape == ()
    assert out["mask"].dtype == np.bool_ and out["text"].dtype == object
    assert out["x"].min() >= 0 and out["x"].max() < 1
    again = make_sample_inputs(specs, batch=4)
    assert all(np.array_equal(out[k], again[k]) for k in out)  # deterministic


# --- the two CPU runtimes agree -----------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_and_openvino_agree(models: dict[str, Path], model: str, batch: int) -> None:
    ort_s = ORT_CPU.load(models[model], "CPU", OPTS)
    ov_s = OPENVINO.load(models[model], "CPU", OPTS)
    try:
        assert ort_s.inputs == ov_s.inputs
        assert ort_s.outputs == ov_s.outputs
        feed = _random_input(ort_s, batch)
        a, b = ort_s.infer(feed), ov_s.infer(feed)
        assert a.keys() == b.keys() == {ort_s.outputs[0].name}
        for name in a:
            assert a[name].shape[0] == batch
            np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=ATOL)
    finally:
        ort_s.close()
        ov_s.close()


def test_specs_describe_dynamic_batch(models: dict[str, Path]) -> None:
    s = OPENVINO.load(models["cnn"], "CPU", OPTS)
    assert s.runtime == "openvino" and s.device == "CPU"
    assert s.inputs == [TensorSpec("image", "FP32", (-1, 3, 32, 32))]
    assert s.outputs == [TensorSpec("logits", "FP32", (-1, 10))]


@pytest.mark.parametrize("backend", [ORT_CPU, OPENVINO], ids=lambda b: b.name)
def test_infer_is_thread_safe_and_outputs_are_owned(
    models: dict[str, Path], backend: Backend
) -> None:
    session = backend.load(models["cnn"], "CPU", OPTS)
    feeds = [_random_input(session, batch=1 + i % 3, seed=i) for i in range(8)]
    expected = [session.infer(f)["logits"] for f in feeds]
    kept = expected[0].copy()
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(10):
                results[i] = session.infer(feeds[i])["logits"]
                np.testing.assert_allclose(results[i], expected[i], rtol=RTOL, atol=ATOL)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    # Later calls on pooled requests must not have written into an earlier result.
    np.testing.assert_array_equal(expected[0], kept)
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.infer(feeds[0])


@pytest.mark.parametrize("backend", [ORT_CPU, OPENVINO], ids=lambda b: b.name)
def test_bad_requests_are_value_errors(models: dict[str, Path], backend: Backend) -> None:
    s = backend.load(models["mlp"], "CPU", OPTS)
    x = np.zeros((2, 64), np.float32)
    assert list(s.infer({"x": x}, ["y"])) == ["y"]
    with pytest.raises(ValueError, match="unknown output"):
        s.infer({"x": x}, ["nope"])
    with pytest.raises(ValueError, match="missing input"):
        s.infer({})
    with pytest.raises(ValueError, match="must be FP32"):
        s.infer({"x": x.astype(np.float64)})
    with pytest.raises(ValueError, match="shape"):
        s.infer({"x": np.zeros((2, 63), np.float32)})


# --- selection and fallback ---------------------------------------------------------------


def test_digits_lands_on_onnxruntime_with_openvino_reason(
    digits: DigitsModel, cpu_only: HardwareInfo
) -> None:
    loaded = load_first_workable(digits.path, None, cpu_only, OPTS)
    s = loaded.session
    try:
        assert (s.runtime, s.device) == ("onnxruntime", "CPU")
        by_runtime = {a.runtime: a for a in loaded.attempts}
        assert by_runtime["cuda"] == Attempt("cuda", "", False, "no NVIDIA GPU detected")
        ov = by_runtime["openvino"]
        assert not ov.ok and ov.device == "CPU"
        assert "ai.onnx.ml" in ov.reason and "\n" not in ov.reason
        assert loaded.attempts[-1] == Attempt("onnxruntime", "CPU", True, "")

        out = s.infer({"x": digits.x_test})
        np.testing.assert_array_equal(out["label"], digits.sklearn_pred)
        assert out["label"].dtype == np.int64
        np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
        assert (out["label"] == digits.y_test).mean() > 0.9
        assert list(s.infer({"x": digits.x_test[:3]}, ["label"])) == ["label"]
    finally:
        s.close()


def test_openvino_then_onnxruntime_falls_back(digits: DigitsModel, hw: HardwareInfo) -> None:
    loaded = load_first_workable(digits.path, ["openvino", "onnxruntime"], hw, OPTS)
    assert [(a.runtime, a.ok) for a in loaded.attempts] == [
        ("openvino", False),
        ("onnxruntime", True),
    ]
    assert loaded.attempts[0].reason.startswith("OpenVINO cannot read the model")
    loaded.session.close()


def test_silero_vad_lands_on_onnxruntime(cpu_only: HardwareInfo) -> None:
    try:
        path = silero_vad_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    # Silero needs a real 512-sample window at 16 kHz; generic sample inputs cannot run it.
    window: dict[str, np.ndarray] = {
        "input": np.zeros((1, 512), np.float32),
        "sr": np.array(16000, np.int64),
    }
    loaded = load_first_workable(path, None, cpu_only, OPTS, sample_inputs=window)
    s = loaded.session
    assert (s.runtime, s.device) == ("onnxruntime", "CPU")
    ov = next(a for a in loaded.attempts if a.runtime == "openvino")
    assert not ov.ok and "If_0" in ov.reason  # the node inside the If OpenVINO cannot convert
    out = s.infer({**window, "state": np.zeros((2, 1, 128), np.float32)})
    assert out["output"].shape == (1, 1) and out["stateN"].shape == (2, 1, 128)
    s.close()

    # Without the window the warm-up fails everywhere, and says so.
    with pytest.raises(NoRuntimeError) as info:
        load_first_workable(path, ["onnxruntime"], cpu_only, OPTS)
    assert info.value.attempts[0].reason.startswith("warm-up failed:")


def test_garbage_model_fails_everywhere_with_every_reason(tmp_path: Path, hw: HardwareInfo) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf\xff" * 50)
    with pytest.raises(NoRuntimeError) as info:
        load_first_workable(bad, ["openvino:CPU", "onnxruntime"], hw, OPTS)
    err = info.value
    assert [(a.runtime, a.device, a.ok) for a in err.attempts] == [
        ("openvino", "CPU", False),
        ("onnxruntime", "CPU", False),
    ]
    assert "OpenVINO cannot read the model" in str(err)
    assert "onnxruntime cannot load the model" in str(err)
    assert "broken.onnx" in str(err)


def test_load_without_warmup(models: dict[str, Path], hw: HardwareInfo) -> None:
    loaded = load_first_workable(models["mlp"], ["onnxruntime"], hw, OPTS, warmup=False)
    assert loaded.session.runtime == "onnxruntime"
    loaded.session.close()


# --- preferences and plans ----------------------------------------------------------------


def test_parse_preference() -> None:
    assert parse_preference("openvino:GPU") == ("openvino", "GPU")
    assert parse_preference(" CUDA ") == ("cuda", None)
    assert parse_preference("onnxruntime") == ("onnxruntime", None)
    assert parse_preference("cuda:1") == ("cuda", "1")
    with pytest.raises(ValueError, match="cuda, openvino, onnxruntime"):
        parse_preference("tensorflow")
    with pytest.raises(ValueError, match="names no device"):
        parse_preference("openvino:")


def test_plan_bad_preference_raises_before_anything(hw: HardwareInfo) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tpu'"):
        plan(["onnxruntime", "tpu"], hw)


def test_plan_default_on_cpu_only(cpu_only: HardwareInfo) -> None:
    assert DEFAULT_PREFERENCE == ("cuda", "openvino", "onnxruntime")
    no_preference: list[list[str] | None] = [None, []]
    for prefer in no_preference:
        candidates, skipped = plan(prefer, cpu_only)
        assert candidates == [Candidate("openvino", "CPU"), Candidate("onnxruntime", "CPU")]
        assert skipped == [Attempt("cuda", "", False, "no NVIDIA GPU detected")]
        assert str(skipped[0]) == "cuda: no NVIDIA GPU detected"


def test_plan_puts_cuda_first_when_present(fake_gpu: HardwareInfo) -> None:
    candidates, skipped = plan(None, fake_gpu)
    assert candidates[0] == Candidate("cuda", "cuda:0")
    assert candidates[1:] == [Candidate("openvino", "CPU"), Candidate("onnxruntime", "CPU")]
    assert skipped == []
    assert plan(["cuda:0"], fake_gpu)[0] == [Candidate("cuda", "cuda:0")]
    _, skipped = plan(["cuda:1"], fake_gpu)
    assert "no device 1" in skipped[0].reason


def test_plan_cuda_without_provider(hw: HardwareInfo) -> None:
    gpu_no_provider = replace(
        hw, nvidia_gpus=(NvidiaGpu(0, "Fake GPU", 8192),), ort_providers=("CPUExecutionProvider",)
    )
    candidates, skipped = plan(["cuda", "onnxruntime"], gpu_no_provider)
    assert candidates == [Candidate("onnxruntime", "CPU")]
    assert skipped[0].runtime == "cuda"
    assert "onnxruntime has no CUDAExecutionProvider" in skipped[0].reason


def test_plan_openvino_devices(hw: HardwareInfo) -> None:
    many = replace(hw, openvino_devices=("CPU", "NPU", "GPU.1", "GPU.0"))
    assert [c.device for c in plan(["openvino"], many)[0]] == ["GPU.0", "GPU.1", "NPU", "CPU"]
    assert [c.device for c in plan(["openvino:GPU"], many)[0]] == ["GPU.0", "GPU.1"]
    assert [c.device for c in plan(["openvino:gpu.1"], many)[0]] == ["GPU.1"]
    # Repeats are tried once: CPU comes from the first entry only.
    assert plan(["openvino:CPU", "openvino"], many)[0][0] == Candidate("openvino", "CPU")
    assert len(plan(["openvino:CPU", "openvino"], many)[0]) == 4

    candidates, skipped = plan(["openvino:GPU", "onnxruntime"], replace(hw, nvidia_gpus=()))
    assert candidates == [Candidate("onnxruntime", "CPU")]
    assert skipped[0].device == "GPU" and "no device GPU" in skipped[0].reason


def test_cuda_claimed_but_absent_falls_back(
    models: dict[str, Path], fake_gpu: HardwareInfo, hw: HardwareInfo
) -> None:
    if "CUDAExecutionProvider" in hw.ort_providers:
        pytest.skip("this onnxruntime really has CUDA; the refusal path cannot be shown")
    loaded = load_first_workable(models["mlp"], None, fake_gpu, OPTS)
    first = loaded.attempts[0]
    assert (first.runtime, first.device, first.ok) == ("cuda", "cuda:0", False)
    assert "no CUDAExecutionProvider" in first.reason and "onnxruntime-gpu" in first.reason
    assert (loaded.session.runtime, loaded.session.device) == ("openvino", "CPU")
    assert loaded.attempts[-1].ok
    loaded.session.close()


def test_explain_mentions_every_preference(hw: HardwareInfo, fake_gpu: HardwareInfo) -> None:
    lines = explain(None, replace(hw, nvidia_gpus=()))
    assert lines[0] == "preference: cuda, openvino, onnxruntime (default)"
    text = "\n".join(lines)
    for entry in DEFAULT_PREFERENCE:
        assert any(line.strip().startswith(f"{entry}:") for line in lines), text
    assert "cuda: skipped: no NVIDIA GPU detected" in text
    assert "openvino: tries first openvino on CPU" in text
    assert "onnxruntime: falls back to onnxruntime on CPU" in text

    gpu_text = "\n".join(explain(["cuda", "openvino:NPU", "onnxruntime"], fake_gpu))
    assert "cuda: tries first cuda on cuda:0 (Fake GPU)" in gpu_text
    assert "openvino:NPU: skipped: no device NPU" in gpu_text

    nothing = explain(["openvino:NPU"], hw)
    assert "no workable runtime" in nothing[-1]


# --- a real GPU, where there is one -------------------------------------------------------


@pytest.mark.gpu
def test_cuda_matches_cpu(models: dict[str, Path], hw: HardwareInfo) -> None:
    if "CUDAExecutionProvider" not in hw.ort_providers or not hw.nvidia_gpus:
        pytest.skip("needs an NVIDIA GPU and onnxruntime-gpu (CUDAExecutionProvider)")
    loaded = load_first_workable(models["cnn"], ["cuda"], hw, OPTS)
    assert loaded.session.runtime == "cuda"
    assert loaded.session.device == f"cuda:{hw.nvidia_gpus[0].index}"
    cpu = ORT_CPU.load(models["cnn"], "CPU", OPTS)
    feed = _random_input(cpu, batch=4)
    np.testing.assert_allclose(
        loaded.session.infer(feed)["logits"], cpu.infer(feed)["logits"], rtol=1e-3, atol=1e-4
    )
    loaded.session.close()
    cpu.close()
