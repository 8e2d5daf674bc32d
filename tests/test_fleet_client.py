"""InferenceClient against a real broker and a minimal responder written here.

The responder stands in for an agent: it echoes a job's inputs back as outputs to the
job's Response Topic with its Correlation Data, and answers errors for a few model
names, so only the client's side of the contract is under test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeinfer.contract.errors import Code
from edgeinfer.contract.topics import DEFAULT_PREFIX
from edgeinfer.fleet.client import InferenceClient, InferenceError, NotFound, ResourceExhausted
from edgeinfer.fleet.mqtt import BrokerError, connect, publish_packet_size
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY, split_response
from tests.broker import Broker

# Model names that make the responder misbehave on purpose.
ERRORS = {
    "missing": ("NOT_FOUND", "model missing is not deployed"),
    "busy": ("RESOURCE_EXHAUSTED", "queue full"),
}
SILENT = "slow"  # never answered
HELD = "held"  # first a `held` UNAVAILABLE, then the answer


class Responder:
    """Answers jobs on `{prefix}/dev/+/jobs` and `{prefix}/pool/+/jobs` like an agent."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, hold_until: int = 0) -> None:
        port = int(url.rsplit(":", 1)[1])
        # With hold_until, jobs are kept until that many arrived, then answered in
        # reverse order: proof that the client matches by correlation, not by order.
        self.hold_until = hold_until
        self.held: list[paho.MQTTMessage] = []
        self.received: list[tuple[str, dict[str, Any], Any]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="responder", protocol=paho.MQTTv5,
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"{prefix}/dev/+/jobs", 1), (f"{prefix}/pool/+/jobs", 1)])
        assert subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            with self.lock:
                if self.hold_until:
                    self.held.append(msg)
                    if len(self.held) < self.hold_until:
                        return
                    batch, self.held = self.held[::-1], []
                else:
                    batch = [msg]
            for m in batch:
                self._answer(m)
        except Exception as exc:  # pragma: no cover - shows up as a client timeout
            print("responder failed:", repr(exc))

    def _answer(self, msg: paho.MQTTMessage) -> None:
        props: Any = msg.properties
        header_length = None
        for key, value in getattr(props, "UserProperty", None) or []:
            if key == HEADER_LENGTH_PROPERTY:
                header_length = int(value)
        try:
            job, tail = split_response(bytes(msg.payload), header_length)
        except ValueError:
            job, tail = {}, b""
        with self.lock:
            self.received.append((msg.topic, job, props))
        model = job.get("model_name")
        if model == SILENT:
            return
        reply_props: Any = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        reply_props.CorrelationData = props.CorrelationData
        if model == HELD:  # as an agent whose state disk was full: told, then answered
            told = {"id": job.get("id"), "error": "the agent's state disk is full",
                    "parameters": {"code": "UNAVAILABLE", "held": True}}
            self.client.publish(props.ResponseTopic, msgspec.json.encode(told), qos=1,
                                properties=reply_props)
        if model is None:
            body: dict[str, Any] = {"id": job.get("id"), "error": "not an OIP request",
                                    "parameters": {"code": "INVALID_ARGUMENT"}}
        elif model in ERRORS:
            code, text = ERRORS[model]
            body = {"id": job.get("id"), "error": text, "parameters": {"code": code}}
        else:
            wanted = {o["name"] for o in job.get("outputs") or []}
            outputs, blobs, offset = [], [], 0
            for t in job["inputs"]:
                size = (t.get("parameters") or {}).get("binary_data_size", 0)
                if not wanted or t["name"] in wanted:
                    outputs.append(t)
                    blobs.append(tail[offset:offset + size])
                offset += size
            tail = b"".join(blobs)
            body = {"id": job["id"], "model_name": model,
                    "model_version": job.get("model_version", "1"), "outputs": outputs,
                    "parameters": {"runtime": "echo", "device": "cpu",
                                   "queue_ms": 0.1, "infer_ms": 0.2}}
        payload = msgspec.json.encode(body)
        if header_length is not None and "error" not in body:
            # Binary in, binary out (inputs' blobs are echoed in order).
            reply_props.UserProperty = [(HEADER_LENGTH_PROPERTY, str(len(payload)))]
            payload += tail
        self.client.publish(props.ResponseTopic, payload, qos=1, properties=reply_props)


@pytest.fixture
def responder(broker: Broker) -> Iterator[Responder]:
    r = Responder(broker.url)
    yield r
    r.close()


@pytest.fixture
def client(broker: Broker) -> Iterator[InferenceClient]:
    with InferenceClient(broker.url) as c:
        yield c


def test_round_trip(responder: Responder, client: InferenceClient) -> None:
    x = np.random.default_rng(0).random((2, 3)).astype(np.float32)
    result = client.infer("digits", {"x": x}, device="gw-1", version="3", priority=5,
                          expiry_s=2.5)
    np.testing.assert_array_equal(result.outputs["x"], x)
    assert result.outputs["x"].dtype == np.float32
    assert result.model_name == "digits"
    assert result.model_version == "3"
    assert result.parameters["runtime"] == "echo"
    topic, job, props = responder.received[0]
    assert topic == "edge/v1/dev/gw-1/jobs"
    assert job["parameters"] == {"priority": 5}
    assert result.id == job["id"]
    assert props.ResponseTopic == f"edge/v1/reply/{client.client_id}/res"
    assert props.ResponseTopic == client.reply_topic
    assert len(props.CorrelationData) == 16
    assert props.MessageExpiryInterval == 3  # rounded up, never early
    assert client.in_flight == 0


def test_pool_outputs_and_binary(responder: Responder, client: InferenceClient) -> None:
    a = np.arange(8, dtype=np.int64).reshape(2, 4)
    b = np.array([True, False])
    result = client.infer("m", {"a": a, "b": b}, pool="cams", outputs=["b"], binary=True)
    assert list(result.outputs) == ["b"]
    np.testing.assert_array_equal(result.outputs["b"], b)
    assert responder.received[0][0] == "edge/v1/pool/cams/jobs"


def test_fifty_jobs_in_flight(broker: Broker, client: InferenceClient) -> None:
    responder = Responder(broker.url, hold_until=50)
    try:
        futures = [
            client.submit("echo", {"x": np.full((1, 4), i, dtype=np.int32)}, device="gw-1",
                          job_id=f"job-{i}")
            for i in range(50)
        ]
        results = [f.result(5) for f in futures]
    finally:
        responder.close()
    for i, r in enumerate(results):
        assert r.id == f"job-{i}"
        np.testing.assert_array_equal(r.outputs["x"], np.full((1, 4), i, dtype=np.int32))
    assert client.in_flight == 0


def test_error_responses_are_typed(responder: Responder, client: InferenceClient) -> None:
    x = {"x": np.zeros(1, np.float32)}
    with pytest.raises(NotFound) as info:
        client.infer("missing", x, device="gw-1", job_id="j-miss")
    assert info.value.code == Code.NOT_FOUND
    assert info.value.job_id == "j-miss"
    assert "not deployed" in str(info.value)
    fut = client.submit("busy", x, device="gw-1")
    exc = fut.exception(5)
    assert isinstance(exc, ResourceExhausted)
    assert isinstance(exc, InferenceError)


def test_a_held_answer_is_not_the_final_one(responder: Responder, client: InferenceClient) -> None:
    result = client.infer(HELD, {"x": np.arange(3, dtype=np.float32)}, device="gw-1",
                          job_id="j-held", timeout=5)
    assert result.id == "j-held"
    np.testing.assert_array_equal(result.outputs["x"], np.arange(3, dtype=np.float32))
    assert client.in_flight == 0


def test_timeout_names_the_job(responder: Responder, client: InferenceClient) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="j-slow"):
        client.infer("slow", {"x": np.zeros(1)}, device="gw-1", job_id="j-slow", timeout=0.3)
    assert time.monotonic() - started < 2
    assert client.in_flight == 0
    # A short timeout submitted after a long one still fires on time.
    long = client.submit("slow", {"x": np.zeros(1)}, device="gw-1", timeout=30)
    short = client.submit("slow", {"x": np.zeros(1)}, device="gw-1", timeout=0.2)
    assert isinstance(short.exception(2), TimeoutError)
    assert not long.done()


def test_publish_raw_gets_the_response_dict(
    responder: Responder, client: InferenceClient
) -> None:
    fut = client.publish_raw("edge/v1/dev/gw-1/jobs", b"\x00 not json")
    assert fut.result(5)["parameters"]["code"] == "INVALID_ARGUMENT"
    ok = client.publish_raw(
        "edge/v1/dev/gw-1/jobs",
        b'{"id": "r1", "model_name": "missing", "inputs": []}',
        user_properties=[("model_name", "missing")],
    ).result(5)
    assert ok == {"id": "r1", "error": "model missing is not deployed",
                  "parameters": {"code": "NOT_FOUND"}}
    assert responder.received[-1][2].UserProperty == [("model_name", "missing")]


def test_argument_checks(client: InferenceClient) -> None:
    x = {"x": np.zeros(1)}
    with pytest.raises(ValueError, match="exactly one"):
        client.submit("m", x)
    with pytest.raises(ValueError, match="exactly one"):
        client.submit("m", x, device="a", pool="b")
    with pytest.raises(ValueError, match="device id"):
        client.submit("m", x, device="a/+")
    with pytest.raises(ValueError, match="client id"):
        InferenceClient("mqtt://127.0.0.1:1", client_id="a/b")


def test_close_fails_pending_jobs(broker: Broker) -> None:
    client = InferenceClient(broker.url)
    fut = client.submit("slow", {"x": np.zeros(1)}, device="nobody", timeout=30)
    client.close()
    assert isinstance(fut.exception(1), BrokerError)
    with pytest.raises(BrokerError, match="closed"):
        client.submit("m", {"x": np.zeros(1)}, device="gw-1")


def test_unreachable_broker() -> None:
    from tests.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match=f"cannot reach broker {url}"):
        InferenceClient(url)


def test_survives_broker_restart(broker: Broker, client: InferenceClient) -> None:
    broker.restart()
    responder = Responder(broker.url)
    try:
        # paho reconnects on its own (1 s backoff); the reply subscription is renewed.
        deadline = time.monotonic() + 4
        while True:
            try:
                r = client.infer("m", {"x": np.ones(2)}, device="gw-1", timeout=0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "no answer after the broker came back"
        np.testing.assert_array_equal(r.outputs["x"], np.ones(2))
    finally:
        responder.close()


def test_publish_raw_to_a_bad_topic_raises_at_once(client: InferenceClient) -> None:
    with pytest.raises(ValueError):
        client.publish_raw("edge/v1/dev/+/jobs", b"{}")
    assert client.in_flight == 0


def test_a_message_over_the_brokers_max_packet_size_fails_at_once(tmp_path: Path) -> None:
    """The broker's CONNACK announces its max_packet_size; a PUBLISH over it fails at once,
    naming the limit, instead of being sent, refused (0x95) and sent again after every
    reconnect while the caller waits for a timeout."""
    limit = 100_000
    broker = Broker(tmp_path / "broker", extra_conf=f"max_packet_size {limit}\n")
    broker.start()
    try:
        with connect(broker.url) as conn:
            assert conn.max_packet_size == limit
            topic = "edge/v1/pool/p/jobs"
            fits = limit - publish_packet_size(topic, 0, 1, None)
            fits -= publish_packet_size(topic, fits, 1, None) - limit  # a longer length field
            assert publish_packet_size(topic, fits, 1, None) == limit
            # Exactly at the limit: the broker takes it (so the size is counted as it counts).
            conn.publish(topic, b"x" * fits).result(5)
            started = time.monotonic()
            with pytest.raises(BrokerError, match=f"over the broker's Maximum Packet Size of {limit}"):
                conn.publish(topic, b"x" * (fits + 1)).result(5)
            assert time.monotonic() - started < 1
            conn.publish(topic, b"small").result(5)  # the connection is still good
        with InferenceClient(broker.url) as client:
            with pytest.raises(BrokerError, match="Maximum Packet Size"):
                client.infer("m", {"x": np.zeros(limit, np.uint8)}, device="gw-1", timeout=5)
            assert client.in_flight == 0
    finally:
        broker.stop()
