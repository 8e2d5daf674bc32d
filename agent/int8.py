"""INT8 at deploy, the agent's side: a version with `quantize: int8` gets its calibration
set (the `.npz` file `quantize_calibration` names, else `health.inputs`), checked against
the model's inputs, and its quantized model, made once into the version's folder
(runtimes/quantize.py) on the reconciler's thread, never the broker's.

Calibration arrays that do not fit the model refuse the version (CalibrationError, naming
input, expected and got shapes) while the old one keeps serving; a quantizer that fails on
the model only costs the int8 candidates (Int8Plan.error): f32 serves.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zipfile
from pathlib import Path

import numpy as np

from edgeinfer.agent import health_gate
from edgeinfer.contract.manifest import ModelSpec
from edgeinfer.runtimes.quantize import (
    CalibrationError,
    Int8Plan,
    QuantizeError,
    calibration_batches,
    calibration_digest,
    check_calibration,
    int8_key,
    int8_path,
    is_classifier,
    onnx_signature,
    quantize_int8,
)

log = logging.getLogger(__name__)

# Without a `health` field, a non-classifier's int8 outputs are compared within these
# (INT8 keeps ~2 significant digits per op; the health defaults, 1e-3/1e-5, would refuse it).
DEFAULT_INT8_RTOL = 5e-2
DEFAULT_INT8_ATOL = 5e-2


def calibration_arrays(spec: ModelSpec, model_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """(arrays by input name, where they come from); raises CalibrationError."""
    name = spec.quantize_calibration
    if name is None:
        try:
            arrays = health_gate.sample_inputs(spec.health) or {}
        except health_gate.HealthError as exc:
            raise CalibrationError(f"health.inputs (the calibration set): {exc}") from None
        return arrays, "health.inputs (the calibration set)"
    source = f"quantize_calibration {name}"
    try:
        with np.load(model_dir / name, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}, source
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{source} cannot be read as an .npz file "
                               f"(numpy.savez): {exc}") from None


def prepare(spec: ModelSpec, model_path: Path, model_dir: Path) -> Int8Plan | None:
    """The int8 candidates' plan, quantizing now unless the version's folder has the model
    already (a restart); None without `quantize`. Raises CalibrationError."""
    if spec.quantize != "int8":
        return None
    try:
        inputs, outputs = onnx_signature(model_path)
    except Exception as exc:  # onnx cannot read what the runtimes may still: f32 serves
        inputs, outputs, unread = [], [], f"int8: the model cannot be read with onnx: {exc}"
    else:
        unread = ""
    arrays, source = calibration_arrays(spec, model_dir)
    rows = check_calibration(inputs, arrays, source) if not unread else 0
    batches = calibration_batches(inputs, arrays, rows) if not unread else []
    key = int8_key(spec.sha256, calibration_digest(arrays))
    dst = int8_path(model_dir, key)
    health = spec.health
    plan = Int8Plan(
        path=dst, batches=batches, classifier=is_classifier(spec.task, outputs),
        min_agreement=spec.quantize_min_agreement,
        rtol=DEFAULT_INT8_RTOL if health is None else health.rtol,
        atol=DEFAULT_INT8_ATOL if health is None else health.atol,
        key=key, error=unread)
    if unread:
        return _failed(plan, unread)
    started = time.monotonic()
    try:
        made = quantize_int8(model_path, dst, batches)
    except QuantizeError as exc:
        log.warning("%s:%s: %s; f32 serves", spec.name, spec.version, exc)
        return _failed(plan, f"int8: {exc}")
    log.info("%s:%s: int8 model %s (%d calibration rows from %s)%s", spec.name,
             spec.version, dst.name, rows, source,
             f" quantized in {time.monotonic() - started:.2f}s" if made else " reused")
    return plan


def _failed(plan: Int8Plan, error: str) -> Int8Plan:
    return dataclasses.replace(plan, path=None, error=error)
