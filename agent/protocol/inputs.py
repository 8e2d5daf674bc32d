"""A request's tensors met with a model: each input checked against the model's declared
inputs (name, datatype, shape, size) and turned into a numpy array, from its JSON data or
from the binary section (agent/protocol/binary.py), so the runtime never sees a bad tensor;
the outputs asked for checked against those the model gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeinfer.agent.protocol.binary import tensor_from_binary
from edgeinfer.agent.protocol.request import RawRequest, RequestTensor
from edgeinfer.contract.datatypes import OIP_DATATYPES
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.runtimes.base import TensorSpec
from edgeinfer.runtimes.datatypes import to_numpy_dtype


def _describe(spec: TensorSpec) -> str:
    dims = ",".join("-1" if d < 0 else str(d) for d in spec.shape)
    return f"{spec.name} ({spec.datatype} [{dims}])"


def check_inputs(
    req: RawRequest, specs: Sequence[TensorSpec], model_label: str, max_elements: int,
    optional: Sequence[TensorSpec] = (),
) -> dict[str, np.ndarray]:
    """Turn the request's tensors into arrays that match the model's declared inputs.

    `specs` must all be given; `optional` ones (a pipeline's knobs) may be.
    """
    by_name = {s.name: s for s in (*specs, *optional)}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    expected = ", ".join(_describe(s) for s in specs) or "no required input"
    if optional:
        expected += "; optional: " + ", ".join(_describe(s) for s in optional)
    for tensor in req.inputs:
        spec = by_name.get(tensor.name)
        if spec is None:
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"unknown input {tensor.name!r}: model {model_label} takes {expected}",
            )
        if tensor.name in arrays:
            raise JobError(Code.INVALID_ARGUMENT, f"input {tensor.name!r} is given twice")
        if tensor.datatype not in OIP_DATATYPES:
            raise JobError(
                Code.INVALID_ARGUMENT, f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}"
            )
        if tensor.datatype != spec.datatype:
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"input {tensor.name!r} has datatype {tensor.datatype}; "
                f"model {model_label} expects {spec.datatype}",
            )
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"input {tensor.name!r} has a negative dimension in shape {list(shape)}",
            )
        if 0 in shape:
            # An empty batch (or any empty dimension): nothing to run. Refused here, as the
            # client's error, before a runtime fails on it and the failure counts against
            # the runtime (agent/failover.py).
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"input {tensor.name!r} has shape {list(shape)}: a dimension of 0 (an empty "
                "batch) leaves nothing to run",
            )
        # A spec of shape () means the runtime does not know the rank: it judges the shape.
        if (spec.shape and len(shape) != len(spec.shape)) or any(
            d < 0 or (want >= 0 and d != want) for d, want in zip(shape, spec.shape, strict=False)
        ):
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"input {tensor.name!r} has shape {list(shape)}; model {model_label} expects "
                f"{_describe(spec)}",
            )
        count = 1
        for d in shape:
            count *= d
        if count > max_elements:
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"input {tensor.name!r} has {count} elements, over the limit of {max_elements}",
            )
        params = tensor.parameters or {}
        if "binary_data_size" in params:
            arrays[tensor.name], offset = tensor_from_binary(tensor, shape, count, req.binary, offset)
        else:
            arrays[tensor.name] = _from_json(tensor, shape, count)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"missing input {', '.join(repr(m) for m in missing)}: model {model_label} takes {expected}",
        )
    if offset != len(req.binary):
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"binary section has {len(req.binary) - offset} bytes that no input claims",
        )
    return arrays


def _from_json(tensor: RequestTensor, shape: tuple[int, ...], count: int) -> np.ndarray:
    if tensor.data is None:
        raise JobError(Code.INVALID_ARGUMENT, f"input {tensor.name!r} has no data")
    dtype = to_numpy_dtype(tensor.datatype)
    try:
        if tensor.datatype == "BYTES":
            flat = np.array(
                [v.encode() if isinstance(v, str) else bytes(v) for v in _flatten(tensor.data)],
                dtype=object,
            )
        else:
            flat = np.asarray(tensor.data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"input {tensor.name!r}: data is not a {tensor.datatype} array ({exc})",
        ) from None
    if flat.size != count:
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"input {tensor.name!r}: shape {list(shape)} needs {count} values, data has {flat.size}",
        )
    return flat.reshape(shape)


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


def check_outputs(req: RawRequest, specs: Sequence[TensorSpec], model_label: str) -> list[str] | None:
    if not req.outputs:
        return None
    known = {s.name for s in specs}
    names = []
    for out in req.outputs:
        if out.name not in known:
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"unknown output {out.name!r}: model {model_label} gives "
                + ", ".join(sorted(known)),
            )
        names.append(out.name)
    return names
