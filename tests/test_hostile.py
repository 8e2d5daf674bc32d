"""Hostile input against a real agent: fuzzed jobs and manifests, floods, oversized answers.

Nothing here may crash the agent or cost a job its one answer, and a valid job sent after
each batch of garbage must still succeed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as mqtt
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.models import build_heavy, build_mlp
from edgeinfer.agent.protocol import HEADER_LENGTH_PROPERTY
from edgeinfer.contract.manifest import ManifestError, decode_manifest
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import ResourceExhausted
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import deploy, reported, running_agent, wait_state

DEVICE = "gw-hostile"
TOPICS = Topics("edge/v1", DEVICE)
REPLY = "edge/v1/reply/fuzzer/r"


class Fuzzer:
    """Publishes raw payloads with correlation ids and collects every answer per id."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.answers: dict[str, list[dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._n = 0
        self.sent: dict[str, tuple[bytes, list[tuple[str, str]] | None]] = {}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer", protocol=mqtt.MQTTv5)
        c.on_message = self._on_message
        c.connect(host, int(port))
        c.loop_start()
        c.subscribe(REPLY, qos=1)[1]
        self.client = c
        time.sleep(0.2)

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        key = msg.properties.CorrelationData.decode()  # type: ignore[union-attr]
        header_len = dict(getattr(msg.properties, "UserProperty", None) or []).get(
            HEADER_LENGTH_PROPERTY)
        raw = msg.payload[: int(header_len)] if header_len else msg.payload
        with self._cond:
            self.answers.setdefault(key, []).append(json.loads(raw))
            self._cond.notify_all()

    def send(self, payload: bytes, user_props: list[tuple[str, str]] | None = None,
             topic: str = TOPICS.jobs) -> str:
        self._n += 1
        key = f"c{self._n}"
        self.sent[key] = (payload, user_props)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = REPLY
        props.CorrelationData = key.encode()
        if user_props:
            props.UserProperty = user_props
        self.client.publish(topic, payload, qos=1, properties=props)
        return key

    def wait(self, keys: list[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: all(k in self.answers for k in keys), timeout)
            missing = [k for k in keys if k not in self.answers]
            assert ok, (f"{len(missing)} of {len(keys)} jobs got no answer, e.g. "
                        f"{[(self.sent[k][0][:200], self.sent[k][1]) for k in missing[:3]]}")
            return {k: self.answers[k][0] for k in keys}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, AgentProcess, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    with running_agent(root, DEVICE, log={"level": "INFO"},
                       jobs={"max_tensor_elements": 100_000}) as (broker, agent):
        mlp = build_mlp(root / "models")
        assert deploy(broker.url, root, "--model", "mlp", "--version", "1", "--file", str(mlp),
                      "--prefer", "onnxruntime", "--wait", "60", device=DEVICE) == 0
        yield broker, agent, root


@pytest.fixture(scope="module")
def fuzzer(stack: tuple[Broker, AgentProcess, Path]) -> Iterator[Fuzzer]:
    f = Fuzzer(stack[0].url)
    yield f
    f.close()


def valid_job(job_id: str = "ok-1", rows: int = 1) -> dict[str, Any]:
    return {"id": job_id, "model_name": "mlp",
            "inputs": [{"name": "x", "shape": [rows, 64], "datatype": "FP32",
                        "data": [0.5] * (64 * rows)}]}


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
dims = st.integers(-10**12, 10**12)


@st.composite
def malformed_job(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str]]]:
    kind = draw(st.sampled_from(["bytes", "truncated", "types", "shape", "binary", "nesting",
                                 "field", "datatype"]))
    body = valid_job(job_id=draw(st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True)))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), []
    if kind == "truncated":
        raw = json.dumps(body).encode()
        return raw[: draw(st.integers(0, len(raw) - 1))], []
    if kind == "types":
        # A value of a type the field cannot take (null is allowed where the field is optional).
        key, wrong = draw(st.sampled_from([
            ("inputs", lambda v: not isinstance(v, list) or bool(v)),
            ("model_name", lambda v: not isinstance(v, str) and v is not None),
            ("id", lambda v: not isinstance(v, str) and v is not None),
            ("outputs", lambda v: not isinstance(v, list) and v is not None),
            ("parameters", lambda v: not isinstance(v, dict) and v is not None),
        ]))
        value = draw(json_values.filter(wrong))
        if key == "inputs" and isinstance(value, list):
            value = [v if not isinstance(v, dict) else 0 for v in value]
        body[key] = value
        return json.dumps(body).encode(), []
    if kind == "shape":
        body["inputs"][0]["shape"] = draw(st.lists(dims, max_size=5))
        return json.dumps(body).encode(), []
    if kind == "binary":
        size = draw(st.integers(1, 10**6))
        body["inputs"][0].pop("data")
        body["inputs"][0]["parameters"] = {"binary_data_size": size}
        header = json.dumps(body).encode()
        tail = draw(st.binary(max_size=300))
        # MQTT strings may not hold control characters: the broker would drop the fuzzer's
        # connection, and the agent would never see the job.
        length = draw(st.one_of(st.just(str(len(header))), st.integers(-5, 10**7).map(str),
                                st.text(st.characters(exclude_categories=["Cc", "Cs"]),
                                        max_size=5)))
        return header + tail, [(HEADER_LENGTH_PROPERTY, length)]
    if kind == "nesting":
        depth = draw(st.integers(50, 200_000))
        return (b'{"id":"deep","model_name":"mlp","inputs":[{"name":"x","shape":[1,64],'
                b'"datatype":"FP32","data":' + b"[" * depth + b"]" * depth + b"}]}"), []
    if kind == "field":
        body["inputs"][0]["name"] = draw(st.text(max_size=30).filter(lambda t: t != "x"))
        return json.dumps(body).encode(), []
    body["inputs"][0]["datatype"] = draw(st.text(max_size=8).filter(lambda t: t != "FP32"))
    return json.dumps(body).encode(), []


# 6,000 malformed jobs a run (each run draws new ones): about 20 s through a real broker,
# which is what the suite's 10-minute budget leaves for it.
BATCHES = 60
PER_BATCH = 100


# No shrinking: each example is a hundred jobs through a broker; a failure names the payload.
@settings(max_examples=BATCHES, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(batch=st.lists(malformed_job(), min_size=PER_BATCH, max_size=PER_BATCH))
def test_fuzzed_jobs_each_get_an_error_and_a_valid_job_still_works(
    fuzzer: Fuzzer, batch: list[tuple[bytes, list[tuple[str, str]]]]
) -> None:
    keys = [fuzzer.send(payload, props) for payload, props in batch]
    answers = fuzzer.wait(keys)
    for key, (payload, _) in zip(keys, batch, strict=True):
        answer = answers[key]
        assert "error" in answer, f"malformed job was answered with outputs: {payload[:300]!r}"
        assert answer["parameters"]["code"] == "INVALID_ARGUMENT", (answer, payload[:300])
        assert answer["error"]
    good = fuzzer.send(json.dumps(valid_job()).encode())
    answer = fuzzer.wait([good])[good]
    assert "outputs" in answer, answer
    assert len(fuzzer.answers[good]) == 1


manifest_values = st.one_of(json_values, st.fixed_dictionaries({
    "revision": st.one_of(st.integers(-5, 10**20), json_values),
    "models": st.one_of(json_values, st.lists(st.dictionaries(
        st.sampled_from(["name", "version", "uri", "sha256", "size", "task", "format",
                         "runtime", "extra"]),
        json_values, max_size=9), max_size=3)),
}))


def _acceptable(payload: bytes) -> bool:
    """Whether the agent's own decoder takes it: such a manifest is not malformed."""
    try:
        decode_manifest(payload)
    except ManifestError:
        return False
    return True


@settings(max_examples=20, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.one_of(manifest_values.map(lambda v: json.dumps(v).encode()),
                                st.binary(max_size=200)).filter(lambda b: not _acceptable(b)),
                      min_size=50, max_size=50))
def test_fuzzed_manifests_are_refused_and_the_model_keeps_serving(
    stack: tuple[Broker, AgentProcess, Path], fuzzer: Fuzzer, batch: list[bytes]
) -> None:
    _, agent, _ = stack
    for payload in batch:
        fuzzer.client.publish(TOPICS.desired, payload, qos=1)  # not retained: the good one stays
    good = fuzzer.send(json.dumps(valid_job()).encode())
    assert "outputs" in fuzzer.wait([good])[good]
    assert agent.proc is not None and agent.proc.poll() is None


def test_manifest_refusals_are_reported(stack: tuple[Broker, AgentProcess, Path],
                                        fuzzer: Fuzzer) -> None:
    broker, _, _ = stack
    fuzzer.client.publish(TOPICS.desired, b'{"revision": "x", "models": 5}', qos=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rep = reported(broker.url, DEVICE)
        if rep["last_error"]:
            break
        time.sleep(0.1)
    assert "manifest" in rep["last_error"]
    assert [m["state"] for m in rep["models"] if m["name"] == "mlp"] == ["serving"]


def _expand_model(path: Path, width: int) -> Path:
    """x FP32 [1, 1] -> y FP32 [1, width]: a small job with a large answer."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])], "expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=[numpy_helper.from_array(np.array([1, width], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def test_answer_over_the_brokers_max_packet_size_is_an_error_not_a_resend_loop(
    tmp_path: Path,
) -> None:
    broker = Broker(tmp_path / "broker", extra_conf="max_packet_size 65536\n")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, "gw-packet", log={"level": "INFO"})
    agent.start()
    try:
        online = wait_state(broker.url, "online", "gw-packet")
        model = _expand_model(tmp_path / "expand.onnx", 50_000)
        assert deploy(broker.url, tmp_path, "--model", "big", "--version", "1", "--file",
                      str(model), "--prefer", "onnxruntime", "--wait", "60",
                      device="gw-packet") == 0
        with InferenceClient(broker.url) as client:
            with pytest.raises(ResourceExhausted, match="maximum packet size"):
                client.infer("big", {"x": np.ones((1, 1), np.float32)}, device="gw-packet",
                             timeout=20)
            # Still connected, same session, and answering.
            time.sleep(1.0)
            again = wait_state(broker.url, "online", "gw-packet")
            assert again["session_id"] == online["session_id"]
            with pytest.raises(ResourceExhausted):
                client.infer("big", {"x": np.ones((1, 1), np.float32)}, device="gw-packet",
                             timeout=20)
        assert "connection to" not in agent.log_text()
    finally:
        agent.stop()
        broker.stop()


def test_flood_at_ten_times_capacity_keeps_memory_flat(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, "gw-flood", log={"level": "INFO"},
                         jobs={"queue_size": 64})
    agent.start()
    try:
        wait_state(broker.url, "online", "gw-flood")
        heavy = build_heavy(tmp_path / "m", width=1024, layers=8)
        assert deploy(broker.url, tmp_path, "--model", "heavy", "--version", "1", "--file",
                      str(heavy), "--prefer", "onnxruntime", "--wait", "60",
                      device="gw-flood") == 0
        assert agent.proc is not None
        proc = psutil.Process(agent.proc.pid)
        x = np.random.default_rng(0).random((128, 64), dtype=np.float32)
        with InferenceClient(broker.url) as client:
            # Sustainable rate, measured: 20 jobs one after the other.
            t0 = time.monotonic()
            for _ in range(20):
                client.infer("heavy", {"x": x}, device="gw-flood", binary=True, timeout=30)
            sustainable = 20 / (time.monotonic() - t0)
            rate = 10 * sustainable
            futures = []
            rss: list[int] = []
            start = time.monotonic()
            sent = 0
            while time.monotonic() - start < 8.0:
                due = int((time.monotonic() - start) * rate)
                while sent < due:
                    futures.append(client.submit("heavy", {"x": x}, device="gw-flood",
                                                 binary=True, timeout=120))
                    sent += 1
                rss.append(proc.memory_info().rss)
                time.sleep(0.05)
            outcomes = {"ok": 0, "RESOURCE_EXHAUSTED": 0}
            for f in futures:
                try:
                    f.result(120)
                    outcomes["ok"] += 1
                except ResourceExhausted:
                    outcomes["RESOURCE_EXHAUSTED"] += 1
        assert outcomes["ok"] + outcomes["RESOURCE_EXHAUSTED"] == len(futures)
        assert outcomes["RESOURCE_EXHAUSTED"] > 0 and outcomes["ok"] > 0
        quarter = len(rss) // 4
        early, late = max(rss[:quarter]), max(rss[-quarter:])
        growth_mb = (late - early) / 2**20
        print(f"\nflood: sustainable {sustainable:.0f} jobs/s, sent {len(futures)} at "
              f"{rate:.0f}/s, {outcomes}, RSS early {early / 2**20:.0f} MB late "
              f"{late / 2**20:.0f} MB")
        assert growth_mb < 40, f"RSS grew {growth_mb:.0f} MB under a flood"
    finally:
        agent.stop()
        broker.stop()
