"""Job ids: a repeat of a request is answered from the journal and says so
(`parameters.replayed`); the same id for a different request is refused, not answered with
the other request's answer. Unit tests of the pieces, then a real mosquitto and a real agent,
also across an agent restart (the journal persists)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest

from bench.models import DigitsModel
from edgeinfer.agent.jobs import request_digest
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.protocol import (
    HEADER_LENGTH_PROPERTY,
    decode_request,
    encode_error,
    encode_response,
    mark_replayed,
)
from edgeinfer.contract.errors import Code
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InvalidArgument
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import deploy, running_agent, wait_state

DEVICE = "gw-jobids"


# --- unit: the replayed flag, the request digest --------------------------------------------


def _request(**parameters: object) -> bytes:
    return msgspec.json.encode({
        "id": "j-1", "model_name": "m",
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "label"}],
        "parameters": parameters,
    })


def test_a_json_answer_is_marked_replayed_and_keeps_the_rest() -> None:
    answer = encode_response(decode_request(_request(), ()), "m", "1",
                             {"label": np.array([3, 4], dtype=np.int64)}, {"runtime": "ort"})
    first = msgspec.json.decode(answer.payload)
    assert "replayed" not in first["parameters"]
    marked = mark_replayed(answer.payload, answer.user_properties)
    again = msgspec.json.decode(marked.payload)
    assert again["parameters"] == {"runtime": "ort", "replayed": True}
    assert {k: v for k, v in again.items() if k != "parameters"} == {
        k: v for k, v in first.items() if k != "parameters"}
    assert marked.user_properties == ()


def test_a_binary_answer_is_marked_and_its_header_length_follows() -> None:
    y = np.array([[0.25, -1.5]], dtype=np.float32)
    answer = encode_response(decode_request(_request(), ()), "m", "1",
                             {"y": y, "label": np.array([1], dtype=np.int64)}, {"infer_ms": 1.5})
    marked = mark_replayed(answer.payload, (("other", "kept"), *answer.user_properties))
    props = dict(marked.user_properties)
    assert props["other"] == "kept"
    length = int(props[HEADER_LENGTH_PROPERTY])
    assert length == int(dict(answer.user_properties)[HEADER_LENGTH_PROPERTY]) + len(',"replayed":true')
    header = msgspec.json.decode(marked.payload[:length])
    assert header["parameters"] == {"infer_ms": 1.5, "replayed": True}
    np.testing.assert_array_equal(np.frombuffer(marked.payload[length:], "<f4").reshape(1, 2), y)


def test_an_error_answer_is_marked_replayed() -> None:
    marked = mark_replayed(encode_error("j-1", Code.NOT_FOUND, "no model m"), ())
    assert msgspec.json.decode(marked.payload) == {
        "error": "no model m", "parameters": {"code": "NOT_FOUND", "replayed": True}, "id": "j-1"}


def _inbound(payload: bytes, props: tuple[tuple[str, str], ...] = (),
             correlation: bytes = b"c1", expiry_s: int | None = None) -> Inbound:
    return Inbound(topic="edge/v1/dev/gw/jobs", payload=payload, qos=1, retain=False,
                   response_topic="edge/v1/reply/c/res", correlation_data=correlation,
                   user_properties=props, expiry_s=expiry_s, received=0.0)


def test_request_digest_is_the_payload_and_the_properties_that_shape_the_request() -> None:
    base = request_digest(_inbound(b"{}", (("model_name", "m"),)))
    # A retry: new correlation data, a lower expiry, other user properties, another order.
    assert request_digest(_inbound(b"{}", (("trace", "t-2"), ("model_name", "m")),
                                   correlation=b"c2", expiry_s=5)) == base
    assert request_digest(_inbound(b"{ }", (("model_name", "m"),))) != base
    assert request_digest(_inbound(b"{}", (("model_name", "n"),))) != base
    assert request_digest(_inbound(b"{}", (("model_name", "m"), ("model_version", "2")))) != base
    assert request_digest(_inbound(b"{}")) != base
    assert request_digest(_inbound(b"{}", ((HEADER_LENGTH_PROPERTY, "2"), ("model_name", "m")))) != base


# --- through a real broker and agent --------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, digits: DigitsModel
          ) -> Iterator[tuple[Broker, AgentProcess]]:
    root = tmp_path_factory.mktemp("jobids")
    with running_agent(root, DEVICE, jobs={"dedup_window_s": 600}) as (broker, agent):
        assert deploy(broker.url, root, "--model", "digits", "--version", "1",
                      "--file", str(digits.path), "--wait", "60", device=DEVICE) == 0
        yield broker, agent


@pytest.fixture(scope="module")
def client(stack: tuple[Broker, AgentProcess]) -> Iterator[InferenceClient]:
    # One client id, so one reply topic: the key of a job id is (reply topic, id).
    with InferenceClient(stack[0].url, client_id="jobids-client") as c:
        yield c


def _x(digits: DigitsModel, i: int) -> np.ndarray:
    return digits.x_test[i : i + 1].astype(np.float32)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_same_id_same_request_is_replayed_with_the_same_outputs(
    client: InferenceClient, digits: DigitsModel, binary: bool
) -> None:
    job_id = f"same-{'bin' if binary else 'json'}"
    first = client.infer("digits", {"x": _x(digits, 0)}, device=DEVICE, job_id=job_id,
                         binary=binary)
    assert "replayed" not in first.parameters and not first.replayed
    again = client.infer("digits", {"x": _x(digits, 0)}, device=DEVICE, job_id=job_id,
                         binary=binary)
    assert again.replayed and again.parameters["replayed"] is True
    assert again.id == job_id
    assert again.outputs.keys() == first.outputs.keys()
    for name, array in first.outputs.items():
        np.testing.assert_array_equal(again.outputs[name], array)
    # The rest of the first answer's parameters, as they were (not a second run's).
    assert {k: v for k, v in again.parameters.items() if k != "replayed"} == first.parameters


def test_same_id_different_request_is_refused_naming_the_id(
    client: InferenceClient, digits: DigitsModel
) -> None:
    first = client.infer("digits", {"x": _x(digits, 1)}, device=DEVICE, job_id="reused")
    with pytest.raises(InvalidArgument) as info:
        client.infer("digits", {"x": _x(digits, 2)}, device=DEVICE, job_id="reused")
    assert "job id 'reused' was already used for a different request" in info.value.message
    assert "use a new id" in info.value.message
    assert info.value.job_id == "reused"
    # The id still stands for the first request.
    again = client.infer("digits", {"x": _x(digits, 1)}, device=DEVICE, job_id="reused")
    assert again.replayed
    np.testing.assert_array_equal(again.outputs["label"], first.outputs["label"])


def test_an_error_answer_is_replayed_too(client: InferenceClient, digits: DigitsModel) -> None:
    bad = {"x": np.zeros((1, 3), dtype=np.float32)}  # digits takes [.., 64]
    with pytest.raises(InvalidArgument) as first:
        client.infer("digits", bad, device=DEVICE, job_id="bad-shape")
    assert first.value.response is not None
    assert "replayed" not in first.value.response["parameters"]
    with pytest.raises(InvalidArgument) as again:
        client.infer("digits", bad, device=DEVICE, job_id="bad-shape")
    assert again.value.response is not None
    assert again.value.response["parameters"] == {"code": "INVALID_ARGUMENT", "replayed": True}
    assert again.value.message == first.value.message


def test_answers_and_digests_outlive_an_agent_restart(
    stack: tuple[Broker, AgentProcess], client: InferenceClient, digits: DigitsModel
) -> None:
    broker, agent = stack
    first = client.infer("digits", {"x": _x(digits, 3)}, device=DEVICE, job_id="kept",
                         binary=True)
    assert not first.replayed
    before = wait_state(broker.url, "online", DEVICE)
    assert agent.stop() == 0
    agent.start()
    deadline = time.monotonic() + 60
    while wait_state(broker.url, "online", DEVICE, timeout=60)["session_id"] == before["session_id"]:
        assert time.monotonic() < deadline, "the restarted agent never came online"
        time.sleep(0.1)
    again = client.infer("digits", {"x": _x(digits, 3)}, device=DEVICE, job_id="kept",
                         binary=True, timeout=30)
    assert again.replayed
    np.testing.assert_array_equal(again.outputs["label"], first.outputs["label"])
    with pytest.raises(InvalidArgument, match="job id 'kept' was already used"):
        client.infer("digits", {"x": _x(digits, 4)}, device=DEVICE, job_id="kept")
