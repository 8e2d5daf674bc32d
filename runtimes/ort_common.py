"""The ONNX Runtime session wrapper shared by the CPU and CUDA backends.

`InferenceSession.run` is documented thread-safe, so one session serves every worker thread
without a lock or a pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from edgeinfer.runtimes.base import (
    BadInput,
    LoadOptions,
    RuntimeLoadError,
    TensorSpec,
    check_request,
    one_line,
    threads_per_instance,
)
from edgeinfer.runtimes.datatypes import from_onnx_type

# ORT logs every failed run and every graph tweak to stderr on its own; we raise (and
# report) the errors ourselves, so keep only its errors and fatals (3 = ERROR).
_LOG_SEVERITY_ERROR = 3

_LOG_SEVERITY_FATAL = 4


def _spec(arg: Any, kind: str) -> TensorSpec:
    try:
        datatype = from_onnx_type(arg.type)
    except ValueError:
        hint = " (for scikit-learn converters, pass options={'zipmap': False})"
        raise RuntimeLoadError(
            f"{kind} {arg.name!r} has type {arg.type}, which is not a plain tensor{hint}"
        ) from None
    # ORT gives ints for fixed dims and None or a symbol ("N", "batch") for dynamic ones.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


class OrtSession:
    """A loaded ONNX Runtime session; `runtime` is "onnxruntime" or "cuda"."""

    def __init__(self, runtime: str, device: str, session: ort.InferenceSession) -> None:
        self.runtime = runtime
        self.device = device
        self.inputs = [_spec(a, "input") for a in session.get_inputs()]
        self.outputs = [_spec(a, "output") for a in session.get_outputs()]
        self._session: ort.InferenceSession | None = session

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        session = self._session  # one read: a concurrent close() cannot pull it from under us
        if session is None:
            raise RuntimeError(f"{self.runtime} session on {self.device} is closed")
        names = check_request(self.inputs, self.outputs, inputs, outputs)
        # A failed run raises with the whole nested status (If node -> Pad node -> message);
        # ORT would also print it to stderr at ERROR level, a second copy nobody reads.
        # RunOptions per call (they are cheap): nothing shared between threads.
        run_options = ort.RunOptions()
        run_options.log_severity_level = _LOG_SEVERITY_FATAL
        try:
            results = session.run(names, dict(inputs), run_options)
        except InvalidArgument as exc:
            # ORT's word that these inputs do not fit the graph (a dimension a node cannot
            # take, ...): the caller's error, past what check_request can see.
            raise BadInput(one_line(exc)) from exc
        return {n: np.asarray(r) for n, r in zip(names, results, strict=True)}

    def close(self) -> None:
        # ORT has no explicit close; dropping the last reference frees the session.
        self._session = None


def open_session(
    path: Path,
    providers: Sequence[str | tuple[str, dict[str, Any]]],
    options: LoadOptions,
) -> ort.InferenceSession:
    if options.precision != "f32":
        raise RuntimeLoadError(f"onnxruntime runs f32 here; precision {options.precision} is not offered")
    so = ort.SessionOptions()
    so.log_severity_level = _LOG_SEVERITY_ERROR
    so.intra_op_num_threads = threads_per_instance(options)
    # Pool threads that spin between runs steal the cores from the agent's own threads
    # (network, journal) and from the other instances: measured on a 2-core machine, two
    # jobs at once on a CNN went from 68 to 77 runs/s with spinning off, one at a time
    # stayed at 82-84.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers))
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... classes
        raise RuntimeLoadError(f"onnxruntime cannot load the model: {one_line(exc)}") from exc
