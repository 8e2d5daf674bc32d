"""OIP v2 (KServe v2) requests and responses over MQTT, with Triton's binary extension.

Decoding turns a payload into an `InferRequest` whose tensors are numpy arrays
checked against the model's declared inputs, so the runtime never sees a bad
tensor. Every problem is a `JobError` with a message that names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from edgeinfer.contract.datatypes import OIP_DATATYPES
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.contract.topics import NAME_RE
from edgeinfer.runtimes.base import TensorSpec
from edgeinfer.runtimes.datatypes import from_numpy_dtype, to_numpy_dtype
from edgeinfer.structcheck import StructError, convert, not_utf8

# Triton's binary-data extension: the JSON header's length, as an MQTT user property.
HEADER_LENGTH_PROPERTY = "Inference-Header-Content-Length"
MODEL_NAME_PROPERTY = "model_name"
MODEL_VERSION_PROPERTY = "model_version"
# The user properties that are part of what a request asks for, beside its payload (the
# request's identity for de-duplication: agent/scheduler.py's request_digest).
REQUEST_PROPERTIES = frozenset({HEADER_LENGTH_PROPERTY, MODEL_NAME_PROPERTY, MODEL_VERSION_PROPERTY})


class _Tensor(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] | None = None


class _Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class _Request(msgspec.Struct):
    inputs: list[_Tensor]
    id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    outputs: list[_Output] | None = None
    parameters: dict[str, Any] | None = None


class _IdOnly(msgspec.Struct):
    id: Any = None


class _Meta(msgspec.Struct):
    id: Any = None
    parameters: Any = None


_request_decoder = msgspec.json.Decoder(_Request)
_id_decoder = msgspec.json.Decoder(_IdOnly)
_meta_decoder = msgspec.json.Decoder(_Meta)
_encoder = msgspec.json.Encoder()
# An answer's header with its members left as they are, for mark_replayed.
_members_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


@dataclass(frozen=True)
class RawRequest:
    """A decoded request before it has met a model: names resolved, tensors not yet checked."""

    id: str | None
    model_name: str
    model_version: str | None
    inputs: list[_Tensor]
    binary: memoryview
    outputs: list[_Output] | None
    parameters: Mapping[str, Any]

    @property
    def timeout_ms(self) -> float | None:
        value = self.parameters.get("timeout_ms")
        if value is None and "timeout" in self.parameters:
            # Triton's own request parameter, in microseconds (tritonclient's `timeout=`).
            micros = self.parameters["timeout"]
            if isinstance(micros, bool) or not isinstance(micros, (int, float)) or micros <= 0:
                raise JobError(Code.INVALID_ARGUMENT, "parameters.timeout must be a positive "
                               "number of microseconds")
            return float(micros) / 1000.0
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise JobError(Code.INVALID_ARGUMENT, "parameters.timeout_ms must be a positive number")
        return float(value)

    @property
    def sent_at_ms(self) -> float | None:
        """When the client sent the job (its wall clock, ms since the epoch), if it says."""
        value = self.parameters.get("sent_at_ms")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise JobError(Code.INVALID_ARGUMENT, "parameters.sent_at_ms must be a positive number")
        return float(value)

    def wants_binary(self, output_name: str) -> bool:
        for out in self.outputs or ():
            if out.name == output_name and out.parameters and "binary_data" in out.parameters:
                return bool(out.parameters["binary_data"])
        return bool(self.parameters.get("binary_data_output", False))


def peek_id(payload: bytes) -> str | None:
    """The job id, if one can be read cheaply: for answering a job we will not run."""
    try:
        value = _id_decoder.decode(payload).id
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) and NAME_RE.match(value) else None


@dataclass(frozen=True)
class JobMeta:
    """What the intake reads of a job before it is journaled: identity and urgency."""

    id: str | None
    priority: int | None
    timeout_ms: float | None
    sent_at_ms: float | None
    cancel: str | None = None  # parameters.cancel: the id of a job to stop


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


def peek_meta(payload: bytes, user_properties: Sequence[tuple[str, str]]) -> JobMeta:
    """Id, priority and timeout of a job, read without decoding its tensors.

    Anything unreadable reads as absent: the full decode later names the problem.
    """
    header = payload
    length = dict(user_properties).get(HEADER_LENGTH_PROPERTY)
    # isdecimal() alone would let "²" through, which int() refuses.
    if length is not None and length.isascii() and length.isdecimal() and (
            0 < int(length) <= len(payload)):
        header = payload[: int(length)]
    try:
        meta = _meta_decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return JobMeta(None, None, None, None)
    return _job_meta(meta.id, meta.parameters)


def meta_of(req: RawRequest) -> JobMeta:
    """What `peek_meta` reads, taken from a request decoded in full (no second parse)."""
    return _job_meta(req.id, req.parameters)


def _job_meta(raw_id: Any, parameters: Any) -> JobMeta:
    job_id = raw_id if isinstance(raw_id, str) and NAME_RE.match(raw_id) else None
    params = parameters if isinstance(parameters, Mapping) else {}
    priority = params.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, int) or priority <= 0:
        priority = None
    timeout_ms = _number(params.get("timeout_ms"))
    micros = _number(params.get("timeout"))  # Triton's, in microseconds
    if timeout_ms is None and micros is not None:
        timeout_ms = micros / 1000.0
    cancel = params.get("cancel")
    if not isinstance(cancel, str) or not NAME_RE.match(cancel):
        cancel = None
    return JobMeta(job_id, priority, timeout_ms, _number(params.get("sent_at_ms")), cancel)


def _request_problem(header: bytes | memoryview) -> str:
    """Which key of a request the typed decode refused, in our words (runtimes/structcheck).

    Only on that error path: the hot path keeps msgspec's fast typed decode.
    """
    try:
        convert(msgspec.json.decode(header), _Request)
    except StructError as exc:
        return str(exc)
    except (msgspec.DecodeError, RecursionError):
        pass
    return "not an OIP v2 inference request"


def decode_request(
    payload: bytes, user_properties: Sequence[tuple[str, str]]
) -> RawRequest:
    props = dict(user_properties)
    header_len_text = props.get(HEADER_LENGTH_PROPERTY)
    if header_len_text is not None:
        try:
            header_len = int(header_len_text)
        except ValueError:
            raise JobError(
                Code.INVALID_ARGUMENT, f"{HEADER_LENGTH_PROPERTY} must be an integer"
            ) from None
        if not 0 < header_len <= len(payload):
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"{HEADER_LENGTH_PROPERTY}={header_len} does not fit a payload of {len(payload)} bytes",
            )
        header = payload[:header_len]
        binary = memoryview(payload)[header_len:]
    else:
        header = payload
        binary = memoryview(b"")
    try:
        req = _request_decoder.decode(header)
    except msgspec.ValidationError:
        raise JobError(Code.INVALID_ARGUMENT,
                       f"malformed inference request: {_request_problem(header)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Bad UTF-8 is a DecodeError in some msgspec releases, a UnicodeDecodeError in others.
        why = not_utf8(header)
        if why is not None:
            raise JobError(Code.INVALID_ARGUMENT, f"request is not UTF-8: {why}") from None
        raise JobError(Code.INVALID_ARGUMENT, f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise JobError(Code.INVALID_ARGUMENT, "request is nested too deeply") from None

    if req.id is not None and not NAME_RE.match(req.id):
        raise JobError(Code.INVALID_ARGUMENT, "id must match [A-Za-z0-9._-]{1,64}")
    name = req.model_name or props.get(MODEL_NAME_PROPERTY)
    version = req.model_version or props.get(MODEL_VERSION_PROPERTY)
    if not name:
        raise JobError(
            Code.INVALID_ARGUMENT,
            "no model named: set model_name in the request or as an MQTT user property",
        )
    if not NAME_RE.match(name):
        raise JobError(Code.INVALID_ARGUMENT, "model_name must match [A-Za-z0-9._-]{1,64}")
    if version is not None and not NAME_RE.match(version):
        raise JobError(Code.INVALID_ARGUMENT, "model_version must match [A-Za-z0-9._-]{1,64}")
    if not req.inputs:
        raise JobError(Code.INVALID_ARGUMENT, "the request has no inputs")
    return RawRequest(
        id=req.id,
        model_name=name,
        model_version=version,
        inputs=req.inputs,
        binary=binary,
        outputs=req.outputs,
        parameters=req.parameters or {},
    )


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
            arrays[tensor.name], offset = _from_binary(tensor, shape, count, req.binary, offset)
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


def _from_json(tensor: _Tensor, shape: tuple[int, ...], count: int) -> np.ndarray:
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


def _from_binary(
    tensor: _Tensor, shape: tuple[int, ...], count: int, binary: memoryview, offset: int
) -> tuple[np.ndarray, int]:
    size = (tensor.parameters or {}).get("binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise JobError(
            Code.INVALID_ARGUMENT, f"input {tensor.name!r}: binary_data_size must be an integer"
        )
    if offset + size > len(binary):
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"input {tensor.name!r}: binary_data_size {size} runs past the payload's end",
        )
    if tensor.datatype == "BYTES":
        return _bytes_from_binary(tensor.name, shape, count,
                                  binary[offset : offset + size]), offset + size
    dtype = to_numpy_dtype(tensor.datatype)
    if size != count * dtype.itemsize:
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"input {tensor.name!r}: shape {list(shape)} of {tensor.datatype} needs "
            f"{count * dtype.itemsize} bytes, binary_data_size says {size}",
        )
    # No copy: the array views the payload (read-only), which lives as long as the job.
    array = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
    return array.reshape(shape), offset + size


def _bytes_from_binary(name: str, shape: tuple[int, ...], count: int,
                       section: memoryview) -> np.ndarray:
    """Triton's binary BYTES: each element a 4-byte little-endian length, then its bytes."""
    items: list[bytes] = []
    pos = 0
    while pos < len(section):
        if pos + 4 > len(section):
            raise JobError(Code.INVALID_ARGUMENT,
                           f"input {name!r}: BYTES element length cut short at byte {pos}")
        length = int.from_bytes(section[pos : pos + 4], "little")
        pos += 4
        if pos + length > len(section):
            raise JobError(Code.INVALID_ARGUMENT,
                           f"input {name!r}: BYTES element of {length} bytes runs past its data")
        items.append(bytes(section[pos : pos + length]))
        pos += length
        if len(items) > count:
            break
    if len(items) != count:
        raise JobError(Code.INVALID_ARGUMENT,
                       f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, "
                       f"the binary data holds {len(items)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _bytes_to_binary(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(len(raw).to_bytes(4, "little") + raw)
    return b"".join(parts)


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


@dataclass(frozen=True)
class Encoded:
    payload: bytes
    user_properties: tuple[tuple[str, str], ...]


def encode_response(
    req: RawRequest,
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any],
) -> Encoded:
    out_json: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        arr = np.asarray(array)
        datatype = from_numpy_dtype(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if req.wants_binary(name):
            if datatype == "BYTES":
                raw = _bytes_to_binary(arr)
            else:
                raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in arr.reshape(-1)
            ]
        else:
            entry["data"] = arr.reshape(-1).tolist()
        out_json.append(entry)
    body: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": out_json,
        "parameters": dict(parameters),
    }
    if req.id is not None:
        body["id"] = req.id
    header = _encoder.encode(body)
    if not blobs:
        return Encoded(header, ())
    return Encoded(header + b"".join(blobs), ((HEADER_LENGTH_PROPERTY, str(len(header))),))


def encode_error(job_id: str | None, code: Code, message: str, *, held: bool = False) -> bytes:
    """An error answer. `held`: not the job's final answer; the job was kept (the state
    disk was full) and its answer follows once it has run (docs/protocol.md)."""
    params: dict[str, Any] = {"code": code.value}
    if held:
        params["held"] = True
    body: dict[str, Any] = {"error": message, "parameters": params}
    if job_id is not None:
        body["id"] = job_id
    return _encoder.encode(body)


def mark_replayed(payload: bytes, user_properties: Sequence[tuple[str, str]]) -> Encoded:
    """A stored answer (ours: a response or an error) with `parameters.replayed: true`.

    Done here, when an answer is served again, so the first answer pays nothing for it.
    Only `parameters` is decoded and written again; the other members (the outputs) are
    copied as raw JSON, the binary tail as bytes, and the header length is updated.
    """
    props = dict(user_properties)
    length = props.get(HEADER_LENGTH_PROPERTY)
    cut = len(payload) if length is None else int(length)
    members = _members_decoder.decode(payload[:cut])
    params = msgspec.json.decode(members["parameters"]) if "parameters" in members else {}
    params["replayed"] = True
    members["parameters"] = msgspec.Raw(_encoder.encode(params))
    header = _encoder.encode(members)
    if length is None:
        return Encoded(header, tuple(user_properties))
    return Encoded(header + payload[cut:], tuple(
        (k, str(len(header)) if k == HEADER_LENGTH_PROPERTY else v) for k, v in user_properties))
