"""Open Inference Protocol (KServe v2) request and response bodies, without transport.

JSON tensors carry `data` as a flat row-major list. With Triton's binary-data extension
the JSON header is followed by raw little-endian tensor bytes; the header length travels
beside the payload (the `Inference-Header-Content-Length` user property over MQTT).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from edgeinfer.contract.errors import Code
from edgeinfer.contract.queries import QueryAnswer, QueryKind, read_answer
from edgeinfer.fleet.errors import Internal, error_from_code

HEADER_LENGTH_PROPERTY = "Inference-Header-Content-Length"

# OIP datatype -> numpy dtype, explicitly little-endian: binary tensors are LE on the wire.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPE_OF_KIND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}


@dataclass(frozen=True)
class InferResult:
    """A successful response: outputs as numpy arrays of the declared shape and type."""

    id: str | None
    model_name: str | None
    model_version: str | None
    outputs: dict[str, np.ndarray[Any, Any]]
    # runtime, device, queue_ms, infer_ms as the agent reports them.
    parameters: dict[str, Any] = field(default_factory=dict)
    # The JSON header of the response as received (binary tensor data not included).
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def replayed(self) -> bool:
        """The agent answered from its journal: this job id (same request, same reply
        topic) was answered before within its de-duplication window, and did not run again."""
        return self.parameters.get("replayed") is True


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The OIP datatype of an array; raises ValueError for one OIP cannot carry."""
    kind = array.dtype.kind
    if kind in "USO":
        return "BYTES"
    name = _DATATYPE_OF_KIND_SIZE.get((kind, array.dtype.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {array.dtype} has no OIP datatype")
    return name


def _bytes_elements(array: np.ndarray[Any, Any]) -> list[bytes]:
    out = []
    for item in array.ravel().tolist():
        out.append(item.encode() if isinstance(item, str) else bytes(item))
    return out


def _tensor_blob(array: np.ndarray[Any, Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        # Triton's BYTES layout: each element is a 4-byte little-endian length, then bytes.
        return b"".join(struct.pack("<I", len(b)) + b for b in _bytes_elements(array))
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def _json_data(name: str, array: np.ndarray[Any, Any], datatype: str) -> list[Any]:
    if datatype != "BYTES":
        return list(array.ravel().tolist())
    try:
        return [b.decode() for b in _bytes_elements(array)]
    except UnicodeDecodeError:
        raise ValueError(
            f"input {name!r} holds bytes that are not UTF-8 text: send it with binary=True"
        ) from None


def encode_request(
    job_id: str,
    model: str,
    inputs: Mapping[str, Any],
    *,
    version: str | None = None,
    outputs: Iterable[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    binary: bool = False,
) -> tuple[bytes, int | None]:
    """The request body and, when `binary`, the JSON header's length."""
    if not inputs:
        raise ValueError("a job needs at least one input")
    body: dict[str, Any] = {"id": job_id, "model_name": model}
    if version is not None:
        body["model_version"] = version
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = datatype_of(array)
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            blob = _tensor_blob(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _json_data(name, array, datatype)
        tensors.append(tensor)
    body["inputs"] = tensors
    params = dict(parameters or {})
    wanted = list(outputs) if outputs is not None else None
    if wanted is not None:
        body["outputs"] = [
            {"name": n, "parameters": {"binary_data": True}} if binary else {"name": n}
            for n in wanted
        ]
    elif binary:
        params["binary_data_output"] = True
    if params:
        body["parameters"] = params
    header = msgspec.json.encode(body)
    if not binary:
        return header, None
    return header + b"".join(blobs), len(header)


def split_response(payload: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header as a dict and the binary tail; raises ValueError if malformed."""
    if header_length is None:
        head, tail = payload, b""
    else:
        if not 0 < header_length <= len(payload):
            raise ValueError(
                f"{HEADER_LENGTH_PROPERTY} {header_length} does not fit a "
                f"{len(payload)}-byte payload"
            )
        head, tail = payload[:header_length], payload[header_length:]
    try:
        doc = msgspec.json.decode(head)
    except msgspec.DecodeError as exc:
        raise ValueError(f"response is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("response is not a JSON object")
    return doc, tail


def result_from_response(doc: dict[str, Any], tail: bytes = b"") -> InferResult:
    """An InferResult, or raises the InferenceError subclass the response's code names."""
    job_id = doc.get("id")
    params = doc.get("parameters") or {}
    if "error" in doc:
        code = params.get("code") if isinstance(params, dict) else None
        raise error_from_code(
            str(code or Code.INTERNAL.value), str(doc["error"]), job_id=job_id, response=doc
        )
    try:
        outputs = _decode_outputs(doc.get("outputs") or [], tail)
    except (ValueError, TypeError, KeyError) as exc:
        raise Internal(
            Code.INTERNAL, f"malformed response to job {job_id}: {exc}", job_id=job_id,
            response=doc,
        ) from None
    return InferResult(
        id=job_id,
        model_name=doc.get("model_name"),
        model_version=doc.get("model_version"),
        outputs=outputs,
        parameters=dict(params) if isinstance(params, dict) else {},
        raw=doc,
    )


def answer_from_response(kind: QueryKind, doc: dict[str, Any]) -> QueryAnswer:
    """A health or metadata query's typed answer (edgeinfer.contract.queries), or raises
    the InferenceError subclass its error's code names, as `result_from_response`."""
    query_id = doc.get("id")
    if "error" in doc:
        params = doc.get("parameters")
        code = params.get("code") if isinstance(params, dict) else None
        raise error_from_code(
            str(code or Code.INTERNAL.value), str(doc["error"]), job_id=query_id, response=doc
        )
    try:
        return read_answer(kind, doc)
    except ValueError as exc:
        raise Internal(Code.INTERNAL, str(exc), job_id=query_id, response=doc) from None


def _decode_outputs(tensors: list[dict[str, Any]], tail: bytes) -> dict[str, np.ndarray[Any, Any]]:
    out: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for t in tensors:
        name, datatype, shape = t["name"], t["datatype"], [int(d) for d in t["shape"]]
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            blob = tail[offset:offset + int(size)]
            if len(blob) != int(size):
                raise ValueError(f"output {name!r}: binary data runs past the payload")
            offset += int(size)
            out[name] = _from_blob(name, blob, datatype, shape)
        else:
            out[name] = _from_json(name, t.get("data", []), datatype, shape)
    return out


def _from_json(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        array = np.empty(len(data), dtype=object)
        array[:] = data
    elif datatype in DTYPES:
        # Some servers send nested lists; asarray + reshape accepts both forms.
        array = np.asarray(data, dtype=DTYPES[datatype])
    else:
        raise ValueError(f"output {name!r} has unsupported datatype {datatype!r}")
    if array.size != int(np.prod(shape)):
        raise ValueError(f"output {name!r} has {array.size} values for shape {shape}")
    return array.reshape(shape)


def _from_blob(name: str, blob: bytes, datatype: str, shape: list[int]) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        items: list[bytes] = []
        pos = 0
        while pos < len(blob):
            (n,) = struct.unpack_from("<I", blob, pos)
            items.append(blob[pos + 4:pos + 4 + n])
            pos += 4 + n
        array = np.empty(len(items), dtype=object)
        array[:] = items
    elif datatype in DTYPES:
        dtype = DTYPES[datatype]
        if len(blob) % dtype.itemsize:
            raise ValueError(f"output {name!r}: {len(blob)} bytes is not a whole {datatype} count")
        array = np.frombuffer(blob, dtype=dtype).copy()
    else:
        raise ValueError(f"output {name!r} has unsupported datatype {datatype!r}")
    if array.size != int(np.prod(shape)):
        raise ValueError(f"output {name!r} has {array.size} values for shape {shape}")
    return array.reshape(shape)
