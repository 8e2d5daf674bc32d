"""The OIP v2 request path without a broker: decoding, checks against the model, encoding."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from edgeinfer.agent.protocol import (
    HEADER_LENGTH_PROPERTY,
    check_inputs,
    check_outputs,
    decode_request,
    encode_error,
    encode_response,
    peek_id,
)
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.runtimes.base import TensorSpec

SPECS = [TensorSpec("x", "FP32", (-1, 4))]


def request(**fields: object) -> bytes:
    body: dict[str, object] = {
        "id": "j-1",
        "model_name": "m",
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
    }
    body.update(fields)
    return json.dumps(body).encode()


def err(payload: bytes, props: tuple[tuple[str, str], ...] = ()) -> JobError:
    with pytest.raises(JobError) as info:
        req = decode_request(payload, props)
        check_inputs(req, SPECS, "m:1", 1000)
        check_outputs(req, [TensorSpec("y", "FP32", (-1, 2))], "m:1")
    return info.value


def test_good_request_becomes_arrays() -> None:
    req = decode_request(request(), ())
    arrays = check_inputs(req, SPECS, "m:1", 1000)
    assert arrays["x"].dtype == np.float32
    np.testing.assert_array_equal(arrays["x"], [[1, 2, 3, 4]])
    assert req.id == "j-1" and req.model_name == "m" and req.model_version is None


def test_nested_data_is_accepted() -> None:
    body = request(inputs=[{"name": "x", "shape": [2, 4], "datatype": "FP32",
                            "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}])
    arrays = check_inputs(decode_request(body, ()), SPECS, "m:1", 1000)
    assert arrays["x"].shape == (2, 4)


def test_model_from_user_properties() -> None:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [0, 0, 0, 0]}]}).encode()
    req = decode_request(body, (("model_name", "m"), ("model_version", "2")))
    assert (req.model_name, req.model_version) == ("m", "2")


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"inputs": 5}', "malformed inference request: key 'inputs': expected a list, got 5"),
        # The key path is ours (runtimes/structcheck), not msgspec's wording.
        (request(inputs=[{"name": "x", "shape": "1x4", "datatype": "FP32", "data": [0] * 4}]),
         "malformed inference request: key 'inputs[0].shape': expected a list, got '1x4'"),
        (request(inputs=[{"name": "x", "shape": [1, 4], "data": [0] * 4}]),
         "malformed inference request: key 'inputs[0].datatype': required key is missing"),
        (request(model_name=None), "no model named"),
        (request(model_name="../etc"), "model_name must match"),
        (request(id="a/b"), "id must match"),
        (request(inputs=[]), "no inputs"),
        (request(inputs=[{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]),
         "unknown input 'z'"),
        (request(inputs=[{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]),
         "expects FP32"),
        (request(inputs=[{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1] * 5}]),
         "has shape [1, 5]"),
        (request(inputs=[{"name": "x", "shape": [-1, 4], "datatype": "FP32", "data": [1] * 4}]),
         "negative dimension"),
        (request(inputs=[{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]),
         "needs 4 values"),
        (request(inputs=[{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a"] * 4}]),
         "not a FP32 array"),
        (request(inputs=[{"name": "x", "shape": [1000, 4], "datatype": "FP32", "data": [0] * 4000}]),
         "over the limit"),
        (request(inputs=[{"name": "x", "shape": [1, 4], "datatype": "FP33", "data": [1] * 4}]),
         "unknown datatype"),
        (request(outputs=[{"name": "nope"}]), "unknown output 'nope'"),
        (request(parameters={"timeout_ms": -5}), None),
    ],
)
def test_bad_requests_name_the_problem(payload: bytes, needle: str | None) -> None:
    if needle is None:
        req = decode_request(payload, ())
        with pytest.raises(JobError, match="timeout_ms"):
            _ = req.timeout_ms
        return
    e = err(payload)
    assert e.code == Code.INVALID_ARGUMENT
    assert needle in e.message


def test_binary_input_is_a_view_of_the_payload() -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = json.dumps({"model_name": "m", "inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32",
         "parameters": {"binary_data_size": data.nbytes}}]}).encode()
    payload = header + data.tobytes()
    req = decode_request(payload, ((HEADER_LENGTH_PROPERTY, str(len(header))),))
    arrays = check_inputs(req, SPECS, "m:1", 1000)
    np.testing.assert_array_equal(arrays["x"], data)
    assert not arrays["x"].flags.owndata  # np.frombuffer: no copy


@pytest.mark.parametrize("cut", [1, 16, 31])
def test_truncated_binary_section_is_refused(cut: int) -> None:
    data = np.zeros((2, 4), dtype=np.float32)
    header = json.dumps({"model_name": "m", "inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32",
         "parameters": {"binary_data_size": 32}}]}).encode()
    payload = header + data.tobytes()[:-cut]
    e = err(payload, ((HEADER_LENGTH_PROPERTY, str(len(header))),))
    assert "runs past the payload's end" in e.message


def test_header_length_must_fit() -> None:
    e = err(request(), ((HEADER_LENGTH_PROPERTY, "99999"),))
    assert HEADER_LENGTH_PROPERTY in e.message


def test_response_json_and_binary() -> None:
    req = decode_request(request(outputs=[{"name": "y", "parameters": {"binary_data": True}},
                                          {"name": "label"}]), ())
    y = np.array([[0.25, 0.75]], dtype=np.float32)
    label = np.array([1], dtype=np.int64)
    enc = encode_response(req, "m", "1", {"y": y, "label": label}, {"runtime": "onnxruntime"})
    (name, length), = enc.user_properties
    assert name == HEADER_LENGTH_PROPERTY
    header = msgspec.json.decode(enc.payload[: int(length)])
    assert header["id"] == "j-1" and header["model_version"] == "1"
    assert header["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}
    blob = enc.payload[int(length):]
    np.testing.assert_array_equal(np.frombuffer(blob, dtype=np.float32).reshape(1, 2), y)


def test_error_encoding_and_peek() -> None:
    body = msgspec.json.decode(encode_error("j-9", Code.NOT_FOUND, "no such model"))
    assert body == {"id": "j-9", "error": "no such model", "parameters": {"code": "NOT_FOUND"}}
    assert peek_id(b'{"id": "j-9", "inputs": 3}') == "j-9"
    assert peek_id(b"garbage") is None
    assert peek_id(b'{"id": "../../x"}') is None


def test_tritons_timeout_in_microseconds_is_a_deadline() -> None:
    req = decode_request(request(parameters={"timeout": 250_000}), ())
    assert req.timeout_ms == 250.0
    both = decode_request(request(parameters={"timeout": 250_000, "timeout_ms": 10}), ())
    assert both.timeout_ms == 10.0  # ours wins where both are given
    with pytest.raises(JobError, match="microseconds"):
        _ = decode_request(request(parameters={"timeout": "soon"}), ()).timeout_ms


def test_header_length_property_with_non_ascii_digits_reads_as_absent() -> None:
    # "²".isdigit() is True, yet int("²") fails: the intake must not trip over it.
    from edgeinfer.agent.protocol import peek_meta

    meta = peek_meta(b'{"id": "j-7", "inputs": []}', [(HEADER_LENGTH_PROPERTY, "\u00b2")])
    assert meta.id == "j-7"
    e = err(request(), ((HEADER_LENGTH_PROPERTY, "\u00b2"),))
    assert HEADER_LENGTH_PROPERTY in e.message


def test_bytes_that_are_not_utf8_inside_json_strings_are_refused_not_crashed() -> None:
    from edgeinfer.agent.protocol import peek_meta
    from edgeinfer.contract.manifest import ManifestError, decode_manifest

    bad = b'{"id": "\xd2", "inputs": []}'
    e = err(bad)
    assert e.code == Code.INVALID_ARGUMENT and "not UTF-8" in e.message
    assert peek_meta(bad, []).id is None
    with pytest.raises(ManifestError, match="not UTF-8"):
        decode_manifest(b'{"revision": 1, "models": [], "issued_at": "\xd2"}')
