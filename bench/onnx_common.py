"""What the hand-built ONNX reference models share: the opset and IR version they are
written for, the seed their weights come from, seeded weights, and a checked save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

# Opset 17 / IR 8: read by every ONNX Runtime since 1.13 and every OpenVINO since 2023.
OPSET = 17
IR_VERSION = 8

SEED = 0


def save_checked(model: onnx.ModelProto, path: Path) -> Path:
    """Save `model` to `path` after onnx's full check: a broken graph fails here, at build."""
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def seeded_weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """FP32 normal weights scaled by 1/sqrt(fan-in), so activations keep their scale."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    w: np.ndarray = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return w
