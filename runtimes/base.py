"""What every runtime backend offers: describe, infer, close; plus the helpers they share.

The interface is deliberately small (load, describe inputs/outputs, infer, close) so that a
backend never has to stub out something it cannot do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeinfer.runtimes.datatypes import to_numpy_dtype
from edgeinfer.runtimes.hardware import HardwareInfo


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the runtime describes it.

    A tensor whose rank the runtime does not know is described with shape () — that is
    what ONNX Runtime itself reports for it, and OpenVINO is made to agree.
    """

    name: str
    datatype: str  # OIP datatype, e.g. "FP32"
    shape: tuple[int, ...]  # -1 marks a dynamic dimension


class Session(Protocol):
    """One loaded model on one runtime and device. `infer` may be called from many threads."""

    runtime: str  # "onnxruntime" | "openvino" | "cuda"
    device: str  # e.g. "CPU", "GPU.0", "cuda:0"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoadOptions:
    threads: int = 0  # intra-op threads per running job; 0 = the cores split between instances
    # Jobs that run on the session at once (the manifest's `instances`). The runtime gets
    # threads for that: ONNX Runtime the cores divided between them, OpenVINO as many
    # streams (THROUGHPUT hint). The caller keeps to it (agent/served.py).
    instances: int = 1
    # Inference precision: "f32" everywhere; "bf16" only on OpenVINO's CPU (a CPU with
    # AVX512-BF16 or AMX-BF16), which other backends refuse with a RuntimeLoadError.
    precision: str = "f32"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a systemd CPUAffinity=)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_instance(options: LoadOptions) -> int:
    """Intra-op threads for one running job: as configured, else the cores divided between
    the instances (never fewer than one), so instances together do not oversubscribe."""
    if options.threads > 0:
        return options.threads
    return max(1, usable_cores() // max(1, options.instances))


class BadInput(ValueError):
    """Inputs the model cannot take: the caller's error, never the runtime's fault. Raised by
    `check_request` and by a runtime for its library's own such exception type (ONNX
    Runtime's InvalidArgument), so that it is answered INVALID_ARGUMENT and does not count
    toward a failover (agent/failover.py)."""


class RuntimeLoadError(Exception):
    """A model that a runtime cannot load on a device; the message is a reason a person can read."""


class Backend(Protocol):
    """One runtime: which devices it offers on this hardware, and how it loads a model."""

    @property
    def name(self) -> str: ...

    def devices(self, hw: HardwareInfo) -> list[str]:
        """Devices to try, best first; empty when the runtime is unavailable."""
        ...

    def unavailable_reason(self, hw: HardwareInfo) -> str | None:
        """Why the runtime cannot be used here at all, or None when it can."""
        ...

    def load(self, path: Path, device: str, options: LoadOptions) -> Session:
        """Load and compile the model; raises RuntimeLoadError with a readable reason."""
        ...


_WS = re.compile(r"\s+")


def one_line(text: object, limit: int = 600) -> str:
    """Collapse an error text to one line of bounded length, for events and reported state."""
    line = _WS.sub(" ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"


def make_sample_inputs(specs: Sequence[TensorSpec], batch: int = 1) -> dict[str, np.ndarray]:
    """Deterministic, small, correctly typed inputs for a warm-up run.

    A dynamic first dimension becomes `batch`, any other dynamic dimension 1. Values are
    small (floats in [0, 1), integers 0..2) so that index-like inputs stay in range.
    """
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple((batch if i == 0 else 1) if d < 0 else d for i, d in enumerate(spec.shape))
        count = int(np.prod(shape, dtype=np.int64))
        ramp = np.arange(count, dtype=np.int64).reshape(shape)
        dtype = to_numpy_dtype(spec.datatype)
        arr: np.ndarray
        if spec.datatype == "BYTES":
            arr = np.full(shape, b"", dtype=object)
        elif spec.datatype == "BOOL":
            arr = ramp % 2 == 0
        elif dtype.kind == "f":
            arr = ((ramp % 7) / 7.0).astype(dtype)
        else:
            arr = (ramp % 3).astype(dtype)
        # np.asarray: arithmetic on a 0-d array (a scalar input) yields a numpy scalar.
        out[spec.name] = np.asarray(arr, dtype=dtype)
    return out


def _dtype_ok(datatype: str, arr: np.ndarray) -> bool:
    if datatype == "BYTES":
        return arr.dtype.kind in ("O", "S", "U")
    return arr.dtype == to_numpy_dtype(datatype)


def _shape_ok(expected: tuple[int, ...], actual: tuple[int, ...]) -> bool:
    if not expected:  # scalar, or rank unknown to the runtime: let the runtime judge
        return True
    return len(expected) == len(actual) and all(
        e < 0 or e == a for e, a in zip(expected, actual, strict=True)
    )


def check_request(
    session_inputs: Sequence[TensorSpec],
    session_outputs: Sequence[TensorSpec],
    inputs: Mapping[str, Any],
    outputs: Sequence[str] | None,
) -> list[str]:
    """Validate names, datatypes and shapes the same way for every runtime.

    Raises BadInput (a ValueError) with a message fit for an INVALID_ARGUMENT answer; returns the output
    names to produce (all of them when `outputs` is None). Runtimes' own messages for
    these mistakes differ wildly, and some (OpenVINO) convert types silently.
    """
    expected = {s.name: s for s in session_inputs}
    missing = [n for n in expected if n not in inputs]
    unknown = [n for n in inputs if n not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown input(s) {', '.join(unknown)}")
        raise BadInput(f"{'; '.join(parts)}; the model takes {', '.join(expected)}")
    for name, spec in expected.items():
        arr = inputs[name]
        if not isinstance(arr, np.ndarray):
            raise BadInput(f"input {name} must be a numpy array, got {type(arr).__name__}")
        if not _dtype_ok(spec.datatype, arr):
            raise BadInput(f"input {name} must be {spec.datatype}, got numpy {arr.dtype}")
        if not _shape_ok(spec.shape, arr.shape):
            raise BadInput(
                f"input {name} has shape {list(arr.shape)}, the model expects "
                f"{list(spec.shape)} (-1 = any)"
            )
    names = [s.name for s in session_outputs]
    if outputs is None:
        return names
    bad = [n for n in outputs if n not in names]
    if bad:
        raise BadInput(f"unknown output(s) {', '.join(bad)}; the model has {', '.join(names)}")
    return list(outputs)
