"""OpenVINO on any device it lists (CPU, GPU.<n>, NPU), for ONNX models.

Thread safety: an OpenVINO InferRequest must not run two inferences at once, so each call
borrows a request from a small pool of idle ones (a new one is created when none is idle)
and gives it back afterwards. Concurrent callers never share a request, and a steady load
of N worker threads settles on N requests, none created per call.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from openvino.frontend import FrontEndManager

from edgeinfer.runtimes.base import LoadOptions, RuntimeLoadError, TensorSpec, check_request, one_line
from edgeinfer.runtimes.datatypes import from_openvino_type
from edgeinfer.runtimes.hardware import HardwareInfo

# Tried in this order by a bare "openvino" preference: accelerators first, CPU last.
_DEVICE_ORDER = ("GPU", "NPU", "CPU")

# OpenVINO's CPU plugin infers in bf16 by default on CPUs with AMX or AVX512-BF16 (recent
# Xeons): ~1e-2 relative error. The same model must answer the same on every gateway and
# runtime, so the CPU is held to f32; GPUs keep their own (f16) default, which is what one
# picks a GPU for.
_CPU_CONFIG: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}

# LoadOptions.precision values this backend takes; bf16 (CPU only) is asked for by the
# auto-tuner (runtimes/autotune.py), which checks its outputs against an f32 reference.
PRECISIONS = ("f32", "bf16")

_MAX_IDLE_REQUESTS = 16  # bounds memory if a burst of threads once used many requests


# --- errors -------------------------------------------------------------------------------

# Lines of OpenVINO's C++ exception text that locate code rather than say what is wrong.
_NOISE = (
    re.compile(r"^Exception from \S+:\d+:?$"),
    re.compile(r"^Check .* failed at \S+:\d+:?$"),
    re.compile(r"^FrontEnd API failed with \w+:?$"),
    re.compile(r"^Failed operations detailed log:?$"),
)
_NODE = re.compile(r"While validating ONNX node '<Node\((\w+)\): (.*?)>'")


def condense_error(text: str) -> str:
    """OpenVINO's multi-line exception text as one readable line.

    For a model that did not convert, keep the summary (which ops) and the first failed
    node with its message, e.g. "Model wasn't fully converted: No conversion rule found for
    operations: ai.onnx.ml.ArrayFeatureExtractor".
    """
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not any(p.match(ln) for p in _NOISE)]
    if "Summary:" not in lines:
        return one_line(" ".join(lines))
    cut = lines.index("Summary:")
    summary = "; ".join(ln.removeprefix("-- ") for ln in lines[cut + 1 :])
    converted = any(ln.startswith("Model wasn't fully converted") for ln in lines[:cut])
    head = "Model wasn't fully converted" if converted else ""
    detail = ""
    for i, ln in enumerate(lines[:cut]):
        node = _NODE.search(ln)
        if node:
            # The message is the next line that is neither a block header nor a node line.
            msg = next(
                (m for m in lines[i + 1 : cut] if not m.startswith("-- ") and not _NODE.search(m)),
                "",
            )
            detail = f" (first failure: {node.group(1)} node '{node.group(2)}': {msg})"
            break
    return one_line(f"{head}: {summary}{detail}" if head else f"{summary}{detail}")


# --- session ------------------------------------------------------------------------------


def _spec(port: Any, index: int, kind: str) -> TensorSpec:
    names = port.get_names()
    name = port.get_any_name() if names else f"{kind}_{index}"
    try:
        datatype = from_openvino_type(port.get_element_type().get_type_name())
    except ValueError as exc:
        raise RuntimeLoadError(f"{kind} {name!r}: {exc}") from None
    pshape = port.get_partial_shape()
    if pshape.rank.is_dynamic:
        shape: tuple[int, ...] = ()  # unknown rank; ONNX Runtime reports it the same way
    else:
        shape = tuple(d.get_length() if d.is_static else -1 for d in pshape)
    return TensorSpec(name, datatype, shape)


class _RequestPool:
    def __init__(self, compiled: ov.CompiledModel) -> None:
        self._compiled = compiled
        self._idle: list[ov.InferRequest] = []
        self._lock = threading.Lock()

    @contextmanager
    def request(self) -> Iterator[ov.InferRequest]:
        with self._lock:
            req = self._idle.pop() if self._idle else None
        if req is None:
            req = self._compiled.create_infer_request()
        yield req  # on an exception the request is dropped, not reused: its state is unknown
        with self._lock:
            if len(self._idle) < _MAX_IDLE_REQUESTS:
                self._idle.append(req)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


class OpenVinoSession:
    runtime = "openvino"

    def __init__(self, device: str, model: ov.Model, compiled: ov.CompiledModel) -> None:
        self.device = device
        # Described from the model as read, before compilation: the compiled graph may merge
        # tensor names (an Identity removed), and get_any_name() could then pick another.
        # Ports keep their order through compilation, so calls address them by index.
        self.inputs = [_spec(p, i, "input") for i, p in enumerate(model.inputs)]
        self.outputs = [_spec(p, i, "output") for i, p in enumerate(model.outputs)]
        self._out_index = {s.name: i for i, s in enumerate(self.outputs)}
        self._pool: _RequestPool | None = _RequestPool(compiled)

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        pool = self._pool
        if pool is None:
            raise RuntimeError(f"openvino session on {self.device} is closed")
        names = check_request(self.inputs, self.outputs, inputs, outputs)
        feed = {i: inputs[s.name] for i, s in enumerate(self.inputs)}
        with pool.request() as req:
            # share_outputs=False copies each output out of the request's buffers, which
            # the next call on this pooled request overwrites.
            result = req.infer(feed, share_inputs=False, share_outputs=False)
            return {n: np.asarray(result[self._out_index[n]]) for n in names}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
        self._pool = None  # the last reference to the compiled model, once calls finish


# --- backend ------------------------------------------------------------------------------

_core_lock = threading.Lock()
_core: ov.Core | None = None


def _shared_core() -> ov.Core:
    # One Core per process: it loads the device plugins once, and it is thread-safe.
    global _core  # noqa: PLW0603
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


def _check_onnx(path: Path) -> None:
    # edgeinfer serves ONNX (whatever the file is named: the agent's store may drop the
    # suffix). Asking the ONNX reader first matters for a corrupt file: read_model would go
    # on to try the TensorFlow, Paddle ... readers, which print parser errors to stderr and
    # end in a vaguer message.
    if not FrontEndManager().load_by_framework("onnx").supported(str(path)):
        raise RuntimeLoadError(
            f"OpenVINO cannot read the model: {path.name} is not an ONNX model that "
            "OpenVINO's ONNX reader recognises (corrupt or truncated file?)"
        )


def _device_rank(device: str) -> int:
    family = device.split(".", 1)[0]
    return _DEVICE_ORDER.index(family) if family in _DEVICE_ORDER else len(_DEVICE_ORDER)


@dataclass(frozen=True)
class OpenVinoBackend:
    name: str = "openvino"

    def unavailable_reason(self, hw: HardwareInfo) -> str | None:
        if hw.openvino_devices:
            return None
        return hw.runtime_error("openvino") or "OpenVINO lists no devices"

    def devices(self, hw: HardwareInfo) -> list[str]:
        # GPU.0 before GPU.1 before NPU before CPU; unknown device families after those.
        return sorted(hw.openvino_devices, key=lambda d: (_device_rank(d), d))

    def load(self, path: Path, device: str, options: LoadOptions) -> OpenVinoSession:
        core = _shared_core()
        try:
            _check_onnx(path)
            model = core.read_model(str(path))
        except RuntimeLoadError:
            raise
        except Exception as exc:
            raise RuntimeLoadError(
                f"OpenVINO cannot read the model: {condense_error(str(exc))}"
            ) from exc
        if options.precision not in PRECISIONS:
            raise RuntimeLoadError(
                f"OpenVINO precision {options.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if options.precision != "f32" and device != "CPU":
            raise RuntimeLoadError(f"OpenVINO precision {options.precision} is offered on CPU only")
        config = dict(_CPU_CONFIG) if device == "CPU" else {}
        if device == "CPU":
            config["INFERENCE_PRECISION_HINT"] = options.precision
        if options.instances > 1:
            # Several jobs at once: as many streams, the cores shared out between them.
            config["PERFORMANCE_HINT"] = "THROUGHPUT"
            config["NUM_STREAMS"] = str(options.instances)
        if device == "CPU" and options.threads > 0:
            config["INFERENCE_NUM_THREADS"] = options.threads * options.instances
        try:
            compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise RuntimeLoadError(
                f"OpenVINO cannot compile the model for {device}: {condense_error(str(exc))}"
            ) from exc
        return OpenVinoSession(device, model, compiled)


BACKEND = OpenVinoBackend()
