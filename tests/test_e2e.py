"""End to end: a real mosquitto, a real edge-agent process, real models, real disk.

One broker and one agent serve the tests of this module in order; the tests that kill
things start their own.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.models import DigitsModel, build_digits, build_mlp
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import DeadlineExceeded, InvalidArgument, NotFound
from edgeinfer.fleet.mqtt import connect, read_retained
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import Watch, deploy, reported, running_agent, wait_state

DEVICE = "gw-e2e"
TOPICS = Topics("edge/v1", DEVICE)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[DigitsModel, Path]:
    d = tmp_path_factory.mktemp("models")
    return build_digits(d), build_mlp(d)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, AgentProcess]]:
    with running_agent(tmp_path_factory.mktemp("e2e"), DEVICE) as (broker, agent):
        yield broker, agent


@pytest.fixture(scope="module")
def client(stack: tuple[Broker, AgentProcess]) -> Iterator[InferenceClient]:
    with InferenceClient(stack[0].url) as c:
        yield c


def model_status(rep: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    for m in rep["models"]:
        if m["name"] == name and m["version"] == version:
            return dict(m)
    raise AssertionError(f"{name}:{version} not in reported {rep['models']}")


# --- deploy and serve ---------------------------------------------------------------------


def test_deploy_digits_lands_on_onnxruntime_with_reason(
    stack: tuple[Broker, AgentProcess], models: tuple[DigitsModel, Path], tmp_path: Path
) -> None:
    broker, _ = stack
    digits, _ = models
    assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                  "--file", str(digits.path), "--wait", "60", device=DEVICE) == 0
    rep = reported(broker.url, DEVICE)
    status = model_status(rep, "digits", "1")
    assert status["state"] == "serving"
    assert status["runtime"] == "onnxruntime"
    # The default preference tried OpenVINO first; the reason it could not is reported.
    failed = [a for a in status["attempts"] if not a["ok"] and a["runtime"] == "openvino"]
    assert failed and "ai.onnx.ml" in failed[0]["reason"]
    assert rep["revision"] == 1
    assert rep["hardware"]["cpu"]["cores_logical"] >= 1
    assert "CPU" in rep["hardware"]["openvino"]["devices"]


def test_predictions_match_scikit_learn(
    stack: tuple[Broker, AgentProcess], client: InferenceClient,
    models: tuple[DigitsModel, Path],
) -> None:
    digits, _ = models
    window = threading.BoundedSemaphore(64)  # within the agent's queue of 256
    futures = []
    for i in range(len(digits.x_test)):
        window.acquire()
        f = client.submit("digits", {"x": digits.x_test[i : i + 1]}, device=DEVICE, timeout=30)
        f.add_done_callback(lambda _: window.release())
        futures.append(f)
    results = [f.result(60) for f in futures]
    labels = np.array([int(r.outputs["label"][0]) for r in results])
    np.testing.assert_array_equal(labels, digits.sklearn_pred)
    assert (labels == digits.y_test).mean() > 0.9
    params = results[0].parameters
    assert params["runtime"] == "onnxruntime" and params["device"] == "CPU"
    assert params["queue_ms"] >= 0 and params["infer_ms"] > 0


def test_both_cpu_runtimes_serve_the_same_answers(
    stack: tuple[Broker, AgentProcess], client: InferenceClient,
    models: tuple[DigitsModel, Path], tmp_path: Path,
) -> None:
    broker, _ = stack
    _, mlp = models
    assert deploy(broker.url, tmp_path, "--model", "mlp-ov", "--version", "1", "--file", str(mlp),
                  "--prefer", "openvino", "--wait", "60", device=DEVICE) == 0
    assert deploy(broker.url, tmp_path, "--model", "mlp-ort", "--version", "1", "--file", str(mlp),
                  "--prefer", "onnxruntime", "--wait", "60", device=DEVICE) == 0
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    ov = client.infer("mlp-ov", {"x": x}, device=DEVICE)
    ort = client.infer("mlp-ort", {"x": x}, device=DEVICE, binary=True)
    assert ov.parameters["runtime"] == "openvino"
    assert ort.parameters["runtime"] == "onnxruntime"
    np.testing.assert_allclose(ov.outputs["y"], ort.outputs["y"], rtol=1e-4, atol=1e-5)
    # The first model is still there: deploys add models, they do not replace the set.
    assert model_status(reported(broker.url, DEVICE), "digits", "1")["state"] == "serving"


def test_bad_jobs_get_codes_and_the_next_good_job_works(
    stack: tuple[Broker, AgentProcess], client: InferenceClient,
    models: tuple[DigitsModel, Path],
) -> None:
    digits, _ = models
    good = {"x": digits.x_test[:1]}
    with pytest.raises(NotFound, match="not served here"):
        client.infer("nope", good, device=DEVICE)
    with pytest.raises(NotFound, match="no version '9'"):
        client.infer("digits", good, device=DEVICE, version="9")
    with pytest.raises(InvalidArgument, match=r"shape \[1, 63\]"):
        client.infer("digits", {"x": digits.x_test[:1, :63]}, device=DEVICE)
    with pytest.raises(InvalidArgument, match="expects FP32"):
        client.infer("digits", {"x": digits.x_test[:1].astype(np.float64)}, device=DEVICE)
    with pytest.raises(InvalidArgument, match="unknown input 'image'"):
        client.infer("digits", {"image": digits.x_test[:1]}, device=DEVICE)
    with pytest.raises(DeadlineExceeded):
        client.infer("digits", good, device=DEVICE, parameters={"timeout_ms": 0.001})
    raw = client.publish_raw(TOPICS.jobs, b"{this is not json").result(10)
    assert raw["parameters"]["code"] == "INVALID_ARGUMENT" and "JSON" in raw["error"]
    raw = client.publish_raw(TOPICS.jobs, b'{"id": "j-1", "inputs": []}').result(10)
    assert raw["parameters"]["code"] == "INVALID_ARGUMENT" and raw["id"] == "j-1"
    after = client.infer("digits", good, device=DEVICE)
    assert int(after.outputs["label"][0]) == int(digits.sklearn_pred[0])


def test_response_topic_outside_prefixes_is_refused_on_results(
    stack: tuple[Broker, AgentProcess], models: tuple[DigitsModel, Path],
) -> None:
    broker, _ = stack
    digits, _ = models
    results = Watch(broker.url, TOPICS.results)
    conn = results.conn
    try:
        body = json.dumps({"id": "evil-1", "model_name": "digits", "inputs": [
            {"name": "x", "shape": [1, 64], "datatype": "FP32",
             "data": digits.x_test[0].tolist()}]}).encode()
        for topic in ("edge/v1/dev/other/jobs", "edge/v1/reply/#"):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = topic
            conn.publish(TOPICS.jobs, body, properties=props).result(5)
            answer = results.wait()
            assert answer["id"] == "evil-1"
            assert answer["parameters"]["code"] == "INVALID_ARGUMENT"
            assert "response topic" in answer["error"]
    finally:
        results.close()


def test_model_in_user_properties_and_results_topic(
    stack: tuple[Broker, AgentProcess], models: tuple[DigitsModel, Path],
) -> None:
    broker, _ = stack
    digits, _ = models
    results = Watch(broker.url, TOPICS.results)
    conn = results.conn
    try:
        # A body as an OIP client library builds it: no model_name inside.
        body = json.dumps({"id": "up-1", "inputs": [
            {"name": "x", "shape": [1, 64], "datatype": "FP32",
             "data": digits.x_test[3].tolist()}]}).encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("model_name", "digits")]
        conn.publish(TOPICS.jobs, body, properties=props).result(5)
        answer = results.wait()
        assert answer["id"] == "up-1" and answer["model_name"] == "digits"
        label = next(o for o in answer["outputs"] if o["name"] == "label")
        assert label["data"] == [int(digits.sklearn_pred[3])]
    finally:
        results.close()


def test_reconciling_twice_changes_nothing(
    stack: tuple[Broker, AgentProcess], client: InferenceClient,
) -> None:
    broker, _ = stack
    desired = read_retained(broker.url, [TOPICS.desired])[TOPICS.desired]
    before = reported(broker.url, DEVICE)
    events = Watch(broker.url, TOPICS.events)
    try:
        conn = connect(broker.url)
        conn.publish(TOPICS.desired, desired, retain=True).result(5)
        conn.close()
        time.sleep(1.5)
        assert "model_serving" not in events.types()
        assert "deploy_started" not in events.types()
    finally:
        events.close()
    after = reported(broker.url, DEVICE)
    assert [(m["name"], m["version"], m["state"]) for m in after["models"]] == [
        (m["name"], m["version"], m["state"]) for m in before["models"]
    ]


def test_telemetry_carries_health_and_model_figures(
    stack: tuple[Broker, AgentProcess],
) -> None:
    broker, _ = stack
    telemetry = Watch(broker.url, TOPICS.telemetry)
    try:
        doc = telemetry.wait(5)
    finally:
        telemetry.close()
    assert 0 <= doc["health"]["cpu_percent"] <= 100 * 64
    assert doc["health"]["memory"]["total"] > 0 and doc["health"]["disk"]["free"] > 0
    assert doc["queue_depth"] >= 0
    digits = doc["inference"]["models"]["digits:1"]
    assert digits["ok"] >= 100
    assert digits["errors"].get("INVALID_ARGUMENT", 0) >= 1
    lat = digits["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]


def test_removed_model_is_unloaded(
    stack: tuple[Broker, AgentProcess], client: InferenceClient, tmp_path: Path,
) -> None:
    broker, _ = stack
    assert deploy(broker.url, tmp_path, "--remove", "mlp-ort", device=DEVICE) == 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        names = {m["name"] for m in reported(broker.url, DEVICE)["models"]}
        if "mlp-ort" not in names:
            break
        time.sleep(0.2)
    assert "mlp-ort" not in names and "digits" in names
    with pytest.raises(NotFound):
        client.infer("mlp-ort", {"x": np.zeros((1, 64), np.float32)}, device=DEVICE)


# --- processes killed for real ------------------------------------------------------------


def test_will_says_offline_and_restart_serves_from_store_before_broker(
    tmp_path: Path, models: tuple[DigitsModel, Path],
) -> None:
    digits, _ = models
    device = "gw-restart"
    broker = Broker(tmp_path / "broker", persistence=True)
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, device)
    agent.start()
    try:
        online = wait_state(broker.url, "online", device)
        # Deploy from a private copy, so that deleting it later proves the store serves.
        src = tmp_path / "copy.onnx"
        shutil.copy(digits.path, src)
        assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "7",
                      "--file", str(src), "--wait", "60", device=device) == 0
        agent.kill()
        offline = wait_state(broker.url, "offline", device, timeout=40)
        assert offline["session_id"] == online["session_id"]

        # Broker down, artifacts gone: the agent must come back serving from its store.
        broker.stop()
        shutil.rmtree(tmp_path / "artifacts")
        src.unlink()
        first_run = len(agent.log_text())
        agent.start()
        agent.wait_log("restored 1 model(s)", timeout=60)
        second_run = agent.log_text()[first_run:]
        assert "digits:7 serving on onnxruntime/CPU" in second_run
        assert "connected to" not in second_run
        broker.start()
        again = wait_state(broker.url, "online", device)
        assert again["session_id"] != online["session_id"]
        with InferenceClient(broker.url) as c:
            result = c.infer("digits", {"x": digits.x_test[:1]}, device=device, timeout=20)
        assert int(result.outputs["label"][0]) == int(digits.sklearn_pred[0])
        assert result.model_version == "7"
        status = model_status(reported(broker.url, device), "digits", "7")
        assert status["state"] == "serving"
    finally:
        agent.stop()
        broker.stop()


def test_silero_vad_lands_on_onnxruntime_with_openvinos_reason(
    stack: tuple[Broker, AgentProcess], client: InferenceClient, tmp_path: Path
) -> None:
    """The VAD model shipped in the silero-vad wheel: OpenVINO cannot convert its If node."""
    from bench.models import silero_vad_path

    broker, _ = stack
    # Its warm-up needs a real window and rate; the manifest's health inputs give them.
    health = tmp_path / "health.json"
    health.write_text(json.dumps({"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 512], "data": [0.0] * 512},
        {"name": "state", "datatype": "FP32", "shape": [2, 1, 128], "data": [0.0] * 256},
        {"name": "sr", "datatype": "INT64", "shape": [], "data": [16000]},
    ]}))
    assert deploy(broker.url, tmp_path, "--model", "vad", "--version", "5", "--file",
                  str(silero_vad_path()), "--health", str(health), "--wait", "120",
                  device=DEVICE) == 0
    status = model_status(reported(broker.url, DEVICE), "vad", "5")
    assert status["state"] == "serving" and status["runtime"] == "onnxruntime"
    tried = status["attempts"] + status.get("candidates", [])
    refused = [a for a in tried if a["runtime"] == "openvino" and not a["ok"]]
    assert refused, status
    assert any("If" in a["reason"] or "onversion" in a["reason"] for a in refused), refused
    window = np.zeros((1, 512), np.float32)
    result = client.infer("vad", {"input": window, "state": np.zeros((2, 1, 128), np.float32),
                                  "sr": np.array(16000, np.int64)}, device=DEVICE)
    assert 0.0 <= float(result.outputs["output"].reshape(-1)[0]) < 0.5  # silence
