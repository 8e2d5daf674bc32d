"""A manifest entry's INT8-at-deploy fields (docs/protocol.md, "INT8 at deploy").

`quantize: int8` makes a quantized copy of the model an auto-tune candidate, calibrated on
the `.npz` file of `files` that `quantize_calibration` names, else on `health.inputs`; a
classifier's copy serves only at a top-1 agreement of at least `quantize_min_agreement`
with the f32 model (runtimes/quantize.py). Whether the calibration arrays fit the model is
known only at deploy, where the agent refuses the version naming input and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeinfer.contract.tasks import MULTI_MODEL_TASKS

QUANTIZE_MODES = ("int8",)


def quantize_problem(quantize: str | None, calibration: str | None, files: Sequence[str],
                     has_health_inputs: bool, task: str) -> tuple[str, str] | None:
    """(the field at fault, why) for quantize fields that cannot work, else None."""
    if quantize is None:
        if calibration is not None:
            return ("quantize_calibration", "names a calibration file but no quantize mode "
                    "(quantize: int8)")
        return None
    if quantize not in QUANTIZE_MODES:
        return ("quantize", f"unknown quantize value {quantize!r} (known: "
                f"{', '.join(QUANTIZE_MODES)})")
    if task in MULTI_MODEL_TASKS:
        return ("quantize", f"task {task} runs several models; quantize applies to "
                "single-model versions")
    if calibration is None:
        if not has_health_inputs:
            return ("quantize", "no calibration inputs: give health.inputs or "
                    "quantize_calibration (an .npz file of files)")
        return None
    if calibration not in files:
        return ("quantize_calibration", f"{calibration!r} is not one of its files")
    if not calibration.lower().endswith(".npz"):
        return ("quantize_calibration", f"{calibration!r} is not an .npz file (numpy.savez: "
                "one array per model input, rows stacked on the first dimension)")
    return None
