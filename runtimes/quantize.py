"""INT8 at deploy (`quantize: int8`): ONNX Runtime's static quantization of an f32 model on
a calibration set, and the rule that accepts the quantized model as an auto-tune candidate.

Why ONNX Runtime's quantizer and not OpenVINO's: OpenVINO's own INT8 path is NNCF, a heavy
package the agent does not ship; ONNX Runtime's needs only `onnx`, and its QDQ model runs on
both ONNX Runtime (int8 kernels) and OpenVINO (which reads QuantizeLinear/DequantizeLinear
pairs and runs int8 where the CPU has it), so both become candidates.

The quantized model is written once, atomically, beside the f32 one (the version's folder),
named by `int8_key`: the model's sha256, the calibration set's digest and the quantizer's
settings and release, so a restart reuses it and never quantizes again.

Acceptance (`judge`): on every calibration batch the candidate's outputs are compared with
the f32 reference's. A classifier (`is_classifier`) is judged by top-1 agreement, which must
reach the entry's `quantize_min_agreement`; any other model by numpy.isclose within the
tolerance, on every value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from edgeinfer.runtimes.base import Session, TensorSpec, one_line
from edgeinfer.runtimes.datatypes import from_onnx_type, to_numpy_dtype

# Calibration rows per batch when the model's batch dimension is dynamic: big enough that
# calibration is quick, small enough to stay light on a gateway's memory.
CALIBRATION_BATCH = 64
# What the quantizer does (bumped when the settings below change: a new file is made).
QUANTIZER = "ort-static-qdq-s8s8-perchannel-minmax-v1"


class CalibrationError(ValueError):
    """Calibration inputs that do not fit the model; the message names input, expected and got."""


class QuantizeError(RuntimeError):
    """The quantizer failed on this model (an op it cannot handle, say)."""


@dataclass(frozen=True, eq=False)  # its arrays have no truth value
class Int8Plan:
    """What auto-tuning needs to try the INT8 candidates (runtimes/autotune.py)."""

    path: Path | None  # the quantized model; None when quantizing failed (`error` says why)
    batches: list[dict[str, np.ndarray]]  # the calibration set, as model feeds
    classifier: bool  # judged by top-1 agreement, else by tolerance
    min_agreement: float
    rtol: float
    atol: float
    key: str  # int8_key: part of the auto-tune cache key
    error: str = ""


def onnx_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's graph inputs (initializers left out) and outputs, read with onnx."""
    import onnx  # noqa: PLC0415 - only for a version that asks for int8 (a heavy import)

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, from_onnx_type(f"tensor({type_name})"), shape)

    return ([spec(v) for v in model.graph.input if v.name not in inits],
            [spec(v) for v in model.graph.output])


def check_calibration(inputs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray],
                      source: str) -> int:
    """Raise CalibrationError unless `arrays` are the model's inputs, each a stack of rows
    along the first (batch) dimension; returns the number of rows. `source` names where
    the arrays come from in the error."""
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    unknown = [n for n in arrays if n not in names]
    if missing or unknown:
        parts = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown input(s) {', '.join(unknown)}"] if unknown else [])
        raise CalibrationError(f"{source}: {'; '.join(parts)}; the model takes {', '.join(names)}")
    rows: int | None = None
    for spec in inputs:
        arr = arrays[spec.name]
        want = to_numpy_dtype(spec.datatype)
        if arr.dtype != want:
            raise CalibrationError(f"{source}: input {spec.name!r} is {arr.dtype}, the model "
                                   f"expects {spec.datatype} ({want})")
        expected = list(spec.shape)
        if not expected:
            raise CalibrationError(f"{source}: input {spec.name!r} is a scalar or of unknown "
                                   "rank: calibration rows stack on a first (batch) dimension, "
                                   "which it has not")
        fits = arr.ndim == len(expected) and arr.ndim >= 1 and all(
            e < 0 or e == a for e, a in zip(expected[1:], arr.shape[1:], strict=True))
        batch = expected[0] if expected else -1
        if not fits or arr.shape[0] < 1 or (batch > 0 and arr.shape[0] % batch):
            raise CalibrationError(
                f"{source}: input {spec.name!r} has shape {list(arr.shape)}, the model expects "
                f"{expected} (-1 = any; the first dimension stacks calibration rows"
                + (f", a multiple of {batch}" if batch > 0 else "") + ")")
        if rows is not None and arr.shape[0] != rows:
            raise CalibrationError(f"{source}: input {spec.name!r} has {arr.shape[0]} rows, "
                                   f"the others {rows}")
        rows = int(arr.shape[0])
    return rows or 0


def calibration_batches(inputs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray],
                        rows: int) -> list[dict[str, np.ndarray]]:
    """Feeds of the model's batch size (CALIBRATION_BATCH rows where it is dynamic)."""
    fixed = inputs[0].shape[0] if inputs and inputs[0].shape else -1
    step = fixed if fixed > 0 else CALIBRATION_BATCH
    return [{s.name: np.ascontiguousarray(arrays[s.name][i:i + step]) for s in inputs}
            for i in range(0, rows, step)]


def calibration_digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def int8_key(model_sha256: str, calibration: str) -> str:
    """The quantized model's name: a new model, calibration set, quantizer or ONNX Runtime
    release makes a new one."""
    text = f"{model_sha256}|{calibration}|{QUANTIZER}|ort={onnxruntime.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def int8_path(folder: Path, key: str) -> Path:
    return folder / f"model.int8-{key}.onnx"


def _not_preprocess_advice(record: logging.LogRecord) -> bool:
    """quantize_static advises, on the root logger, ONNX Runtime's model pre-processing
    (shape inference, for models it cannot shape otherwise): the agent quantizes without it
    and reports what the result is worth (judge), so the advice is noise in its log."""
    return "pre-processing" not in str(record.msg)


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over the calibration batches."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._batches = list(batches)
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> Mapping[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def quantize_int8(src: Path, dst: Path, batches: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Write the INT8 (QDQ) model of `src` calibrated on `batches` to `dst`, unless `dst`
    exists already (returns False then: nothing was quantized). Raises QuantizeError."""
    if dst.exists():
        return False
    from onnxruntime.quantization import (  # noqa: PLC0415 - needs onnx; int8 versions only
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):  # type: ignore[misc]
        pass

    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    root = logging.getLogger()
    root.addFilter(_not_preprocess_advice)
    try:
        # QDQ: the format both ONNX Runtime and OpenVINO read. Signed int8 activations and
        # weights (S8S8) is ONNX Runtime's recommended default on x86; per-channel weights
        # keep convolutions and dense layers with uneven channels accurate.
        quantize_static(str(src), tmp, Reader(batches), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        os.replace(tmp, dst)
    except Exception as exc:
        raise QuantizeError(f"quantizing failed: {type(exc).__name__}: {one_line(exc)}") from None
    finally:
        root.removeFilter(_not_preprocess_advice)
        Path(tmp).unlink(missing_ok=True)
    return True


def is_classifier(task: str, outputs: Sequence[TensorSpec]) -> bool:
    """Judged by top-1 agreement: the image-classification task, or a model whose outputs
    are all class scores (floating [N, C] with C >= 2) or predicted labels (integer [N] or
    [N, 1]), at least one of them scores."""
    if task == "image-classification":
        return True
    scores = 0
    for o in outputs:
        kind = to_numpy_dtype(o.datatype).kind if o.datatype != "BYTES" else "O"
        if kind == "f" and len(o.shape) == 2 and o.shape[1] != 1 and o.shape[1] != 0:
            scores += 1
        elif kind in "iu" and (len(o.shape) == 1 or (len(o.shape) == 2 and o.shape[1] == 1)):
            continue
        else:
            return False
    return scores > 0


def _top1(arr: np.ndarray) -> np.ndarray:
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim >= 1 else arr.reshape(1, 1)
    return flat.argmax(axis=1) if flat.dtype.kind in "fc" else flat[:, 0]


def judge(reference: Session, candidate: Session, plan: Int8Plan) -> tuple[float, str | None]:
    """(agreement, why it is refused or None): top-1 agreement over the calibration rows
    for a classifier, else the share of output values within rtol/atol (all must be)."""
    agree = total = 0
    worst = 0.0
    for feed in plan.batches:
        want = reference.infer(feed)
        got = candidate.infer(feed)
        if plan.classifier:
            rows = np.ones(next(iter(want.values())).shape[0], dtype=bool)
            for name, ref in want.items():
                rows &= _top1(np.asarray(got[name])) == _top1(np.asarray(ref))
            agree += int(rows.sum())
            total += rows.size
            continue
        for name, ref in want.items():
            a, b = np.asarray(got[name], np.float64), np.asarray(ref, np.float64)
            close = np.isclose(a, b, rtol=plan.rtol, atol=plan.atol)
            agree += int(close.sum())
            total += close.size
            if close.size:
                worst = max(worst, float(np.nanmax(np.abs(a - b))))
    share = agree / total if total else 0.0
    if plan.classifier:
        if share < plan.min_agreement:
            return share, (f"top-1 agreement {share:.4f} on {total} calibration rows is below "
                           f"quantize_min_agreement {plan.min_agreement:g}")
        return share, None
    if agree < total:
        return share, (f"{total - agree} of {total} output values on the calibration set beyond "
                       f"rtol={plan.rtol:g}, atol={plan.atol:g} (max abs diff {worst:.3g})")
    return share, None
