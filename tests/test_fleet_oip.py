"""OIP v2 bodies without a broker: datatypes, JSON and binary tensors, error codes."""

from __future__ import annotations

import json
import struct

import msgspec
import numpy as np
import pytest

from edgeinfer.contract.errors import Code
from edgeinfer.fleet.errors import (
    DeadlineExceeded,
    InferenceError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_from_code,
)
from edgeinfer.fleet.oip import DTYPES, datatype_of, encode_request, result_from_response, split_response


@pytest.mark.parametrize("datatype", sorted(DTYPES))
def test_every_datatype_round_trips_as_json(datatype: str) -> None:
    array = np.arange(6).reshape(2, 3).astype(DTYPES[datatype])
    body, header_length = encode_request("j-1", "m", {"x": array})
    assert header_length is None
    doc = json.loads(body)
    tensor = doc["inputs"][0]
    assert tensor == {"name": "x", "shape": [2, 3], "datatype": datatype,
                      "data": array.ravel().tolist()}
    response = {"id": "j-1", "model_name": "m", "model_version": "1",
                "outputs": [{**tensor, "name": "y"}], "parameters": {"runtime": "ort"}}
    result = result_from_response(response)
    assert result.outputs["y"].dtype == DTYPES[datatype]
    assert result.outputs["y"].shape == (2, 3)
    np.testing.assert_array_equal(result.outputs["y"], array)
    assert result.parameters == {"runtime": "ort"}
    assert result.raw is response


def test_request_fields() -> None:
    body, _ = encode_request(
        "j-9", "digits", {"x": np.zeros((1, 4), np.float32)}, version="3",
        outputs=["label"], parameters={"priority": 5},
    )
    doc = json.loads(body)
    assert doc["id"] == "j-9"
    assert doc["model_name"] == "digits"
    assert doc["model_version"] == "3"
    assert doc["outputs"] == [{"name": "label"}]
    assert doc["parameters"] == {"priority": 5}


def test_binary_request_and_response() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    words = np.array([b"ab", b"\xff\x00"], dtype=object)
    payload, header_length = encode_request("j", "m", {"x": x, "w": words}, binary=True)
    assert header_length is not None
    header = json.loads(payload[:header_length])
    assert header["parameters"] == {"binary_data_output": True}
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 48}
    tail = payload[header_length:]
    assert tail[:48] == x.tobytes()
    assert tail[48:] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 2) + b"\xff\x00"

    # A response in the same layout decodes to the same arrays.
    response = {"id": "j", "outputs": [
        {"name": "y", "shape": [3, 4], "datatype": "FP32",
         "parameters": {"binary_data_size": 48}},
        {"name": "w", "shape": [2], "datatype": "BYTES",
         "parameters": {"binary_data_size": len(tail) - 48}},
    ]}
    head = msgspec.json.encode(response)
    doc, rest = split_response(head + tail, len(head))
    result = result_from_response(doc, rest)
    np.testing.assert_array_equal(result.outputs["y"], x)
    assert list(result.outputs["w"]) == [b"ab", b"\xff\x00"]


def test_bytes_as_json_text() -> None:
    body, _ = encode_request("j", "m", {"prompt": np.array(["hello"])})
    assert json.loads(body)["inputs"][0]["datatype"] == "BYTES"
    with pytest.raises(ValueError, match="binary=True"):
        encode_request("j", "m", {"img": np.array([b"\xff\xd8"], dtype=object)})


def test_unsupported_dtype_and_empty_inputs() -> None:
    with pytest.raises(ValueError, match="no OIP datatype"):
        datatype_of(np.zeros(2, np.complex64))
    with pytest.raises(ValueError, match="at least one input"):
        encode_request("j", "m", {})


@pytest.mark.parametrize(("code", "cls"), [
    ("INVALID_ARGUMENT", InvalidArgument),
    ("NOT_FOUND", NotFound),
    ("RESOURCE_EXHAUSTED", ResourceExhausted),
    ("DEADLINE_EXCEEDED", DeadlineExceeded),
    ("UNAVAILABLE", Unavailable),
    ("INTERNAL", Internal),
])
def test_error_response_raises_its_class(code: str, cls: type[InferenceError]) -> None:
    response = {"id": "j-7", "error": "model nope not found", "parameters": {"code": code}}
    with pytest.raises(cls) as info:
        result_from_response(response)
    err = info.value
    assert isinstance(err, InferenceError)
    assert err.code == Code(code)
    assert err.message == "model nope not found"
    assert err.job_id == "j-7"
    assert err.response is response
    assert str(err) == f"{code}: model nope not found"


def test_unknown_code_stays_generic() -> None:
    err = error_from_code("TEAPOT", "short and stout")
    assert type(err) is InferenceError
    assert err.code == "TEAPOT"


def test_malformed_responses() -> None:
    with pytest.raises(Internal, match="6 values for shape"):
        result_from_response({"id": "j", "outputs": [
            {"name": "y", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]})
    with pytest.raises(Internal, match="unsupported datatype"):
        result_from_response({"outputs": [{"name": "y", "shape": [1], "datatype": "BF16",
                                           "data": [1]}]})
    with pytest.raises(ValueError, match="not JSON"):
        split_response(b"{nope", None)
    with pytest.raises(ValueError, match="does not fit"):
        split_response(b"{}", 10)
