"""INT8 beside f32 and bf16 (`quantize: int8`, runtimes/quantize.py): the CNN and digits
quantized as the agent does it at deploy, timed on the raw runtimes like bench/raw.py's
f32 and bf16, and their top-1 agreement with ONNX Runtime f32 on rows the calibration did
not see.

Per model: a calibration set and a separate evaluation set; the quantizer's time; for each
of onnxruntime-int8 and openvino-int8 (the QDQ model on OpenVINO, compiled f32: its int8
is in the graph) the batch 1 and 8 timings; for every runtime config (f32, bf16, int8) the
top-1 agreement with onnxruntime f32 on the evaluation set, and for digits the accuracy on
its labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import raw
from bench.refmodels import RefModel
from edgeinfer.runtimes.quantize import (
    calibration_batches,
    check_calibration,
    onnx_signature,
    quantize_int8,
)

MODELS = ("mobilenet", "digits", "digits_probs")
CNN_CALIBRATION, CNN_EVAL = 32, 64  # 224x224 images: calibration is the slow part


def _sets(model: RefModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
    """(calibration, evaluation, evaluation labels or None)."""
    if model.name == "mobilenet":
        rng = np.random.default_rng(4321)
        images = rng.random((CNN_CALIBRATION + CNN_EVAL, 3, 224, 224), dtype=np.float32)
        return {"image": images[:CNN_CALIBRATION]}, {"image": images[CNN_CALIBRATION:]}, None
    from bench.models import build_digits

    assert model.path is not None
    d = build_digits(model.path.parent)  # cached: the same model and test split
    half = len(d.x_test) // 2
    return {"x": d.x_test[:half]}, {"x": d.x_test[half:]}, d.y_test[half:]


def _class_scores(outputs: list[Any]) -> np.ndarray:
    """The first floating [N, C] output: the class scores."""
    for out in outputs:
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] > 1:
            return arr
    raise ValueError("no class-score output")


def _predict(run: Callable[[dict[str, np.ndarray]], list[Any]],
             batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([_class_scores(run(b)) for b in batches])


def compare(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, top-5 overlap (the share of the reference's 5 best classes among the
    candidate's 5 best, per row, averaged) and the largest score difference relative to the
    largest reference score: a random-weight CNN gives every row the same top-1 class, so
    top-1 alone says little there, the other two still do."""
    k = min(5, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1)[:, :k]
    top_got = np.argsort(-scores, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_got, strict=True)])
    diff = float(np.max(np.abs(scores.astype(np.float64) - reference)))
    return {"top1": round(float((scores.argmax(1) == reference.argmax(1)).mean()), 4),
            "top5_overlap": round(float(overlap), 4),
            "max_rel_diff": round(diff / max(float(np.max(np.abs(reference))), 1e-30), 5)}


def _ort_run(path: Path) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return lambda feed: list(s.run(None, feed))


def _ov_run(path: Path, precision: str) -> Callable[[dict[str, np.ndarray]], list[Any]]:
    compiled = raw.ov_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    return lambda feed: [request.infer(feed)[o] for o in compiled.outputs]


def bench_model(model: RefModel, work: Path, budget: raw.Budget,
                say: Callable[[str], None]) -> dict[str, Any]:
    assert model.path is not None and model.feed is not None
    calib, evals, labels = _sets(model)
    inputs, _ = onnx_signature(model.path)
    batches = calibration_batches(inputs, calib, check_calibration(inputs, calib, "calibration"))
    eval_batches = calibration_batches(inputs, evals, check_calibration(inputs, evals, "eval"))
    dst = work / f"{model.path.stem}.int8.onnx"
    dst.unlink(missing_ok=True)
    t0 = time.perf_counter()
    quantize_int8(model.path, dst, batches)
    out: dict[str, Any] = {
        "quantize_s": round(time.perf_counter() - t0, 3), "calibration_rows": len(next(
            iter(calib.values()))), "eval_rows": len(next(iter(evals.values()))),
        "quantizer": "onnxruntime quantize_static, QDQ, S8S8, per-channel, MinMax",
        "agreement": {}, "accuracy": {}, "runtimes": {}}
    reference = _predict(_ort_run(model.path), eval_batches)
    out["reference_classes"] = len(set(reference.argmax(1).tolist()))
    ok_bf16, why_bf16 = raw.bf16_supported()
    configs: list[tuple[str, Path, str | None, str]] = [
        ("onnxruntime", model.path, None, ""), ("onnxruntime-int8", dst, None, ""),
        ("openvino-f32", model.path, "f32", ""),
        ("openvino-bf16", model.path, "bf16", "" if ok_bf16 else why_bf16),
        ("openvino-int8", dst, "f32", "")]
    for label, path, precision, skip in configs:
        if skip:
            out["agreement"][label] = f"skipped: {skip}"
            continue
        try:
            run = _ort_run(path) if precision is None else _ov_run(path, precision)
            pred = _predict(run, eval_batches)
        except Exception as exc:
            reason = raw.ov_error(exc) if precision else str(exc).splitlines()[0]
            out["agreement"][label] = f"cannot load: {reason}"
            continue
        out["agreement"][label] = compare(pred, reference)
        if labels is not None:
            out["accuracy"][label] = round(float((pred.argmax(1) == labels).mean()), 4)
    for label, precision in (("onnxruntime-int8", None), ("openvino-int8", "f32")):
        entry: dict[str, Any] = {}
        out["runtimes"][label] = entry
        if isinstance(out["agreement"].get(label), str):
            entry.update(status="cannot load", reason=out["agreement"][label])
            continue
        make, desc = (raw._ort_factory(str(dst)) if precision is None
                      else raw._ov_factory(str(dst), precision))
        entry.update(status="ok", runtime=desc, model_file=dst.name, batches={})
        for batch in raw.BATCHES:
            r = raw.measure_runner(make, model.feed(batch), batch, budget)
            entry["batches"][str(batch)] = r
            say(f"int8 {model.name:13s} {label:16s} b{batch}: p50 {r['p50_ms']:8.3f} ms  "
                f"{r['throughput_items_s']:9.1f} items/s")
    say(f"int8 {model.name}: quantized in {out['quantize_s']} s; top-1 agreement "
        + ", ".join(f"{k} {v}" for k, v in out["agreement"].items()))
    return out


def markdown_section(results: dict[str, Any]) -> list[str]:
    """The INT8 table: speed beside f32 and bf16 (batch-1 p50 and batch-8 items/s) and the
    top-1 agreement with onnxruntime f32 on held-out rows."""
    found = {name: e["int8"] for name, e in results.get("raw", {}).items() if e.get("int8")}
    if not found:
        return []
    md = ["## INT8 at deploy (quantize: int8) beside f32 and bf16", "",
          "The model quantized as the agent does it at deploy (runtimes/quantize.py: ONNX "
          "Runtime `quantize_static`, QDQ, S8S8, per-channel weights, MinMax calibration); "
          "the int8 model on ONNX Runtime and on OpenVINO (which reads the QDQ graph). "
          "Agreement against onnxruntime f32 on rows the calibration did not see "
          "(mobilenet-like: random images on random weights, whose f32 top-1 is the same "
          "class on every row, so its top-5 overlap and score difference say more; digits: "
          "the second half of its test split, the first half calibrates). Timings as in "
          "the raw table.", ""]
    rows = []
    for name, q in found.items():
        runtimes = {**results["raw"][name].get("runtimes", {}), **q["runtimes"]}
        for label in ("onnxruntime", "onnxruntime-int8", "openvino-f32", "openvino-bf16",
                      "openvino-int8"):
            agreement = q["agreement"].get(label)
            b = (runtimes.get(label, {}).get("batches") or {})
            b1, b8 = b.get("1", {}), b.get("8", {})
            if isinstance(agreement, str):
                rows.append([name, label, agreement])
                continue
            rows.append([name, label, b1.get("p50_ms"), b8.get("throughput_items_s"),
                         agreement["top1"], agreement["top5_overlap"], agreement["max_rel_diff"],
                         q["accuracy"].get(label, "-")])
        rows.append([name, "(quantizing)", f"{q['quantize_s']} s on {q['calibration_rows']} "
                     f"calibration rows; compared on {q['eval_rows']} other rows, on which f32 "
                     f"picks {q['reference_classes']} distinct classes"])
    md += _rows(["model", "runtime", "b1 p50 ms", "b8 items/s (1 thread)", "top-1 agreement",
                 "top-5 overlap", "max score diff / max score", "accuracy (labels)"], rows)
    return [*md, ""]


def _rows(head: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return "-" if v is None else (f"{v:,.4g}" if isinstance(v, float) else str(v))

    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    return out + ["| " + " | ".join([cell(c) for c in r] + [""] * (len(head) - len(r))) + " |"
                  for r in rows]
