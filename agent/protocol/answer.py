"""Writing answers: an inference response (outputs as JSON data or in the binary section),
an error answer, and a stored answer marked as served again (`mark_replayed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from edgeinfer.agent.protocol.binary import bytes_to_binary
from edgeinfer.agent.protocol.request import HEADER_LENGTH_PROPERTY, RawRequest
from edgeinfer.contract.errors import Code
from edgeinfer.runtimes.datatypes import from_numpy_dtype

_encoder = msgspec.json.Encoder()
# An answer's header with its members left as they are, for mark_replayed.
_members_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


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
                raw = bytes_to_binary(arr)
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
