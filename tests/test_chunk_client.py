"""Artifacts over MQTT (`mqtt:///artifacts/sha256/<hex>`): a real mosquitto, a real agent
process, the fleet's chunk server (fleet/chunk_server.py) in this process, real models.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnxruntime as ort
import pytest

from bench.models import DigitsModel
from edgeinfer.contract.manifest import ManifestError, decode_manifest
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.chunk_server import ChunkServer, mqtt_artifact_uri
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.deploy import deploy as deploy_spec
from edgeinfer.fleet.deploy import model_spec, parse_base_url, store_artifact
from edgeinfer.fleet.mqtt import connect
from tests.agentproc import AgentProcess
from tests.broker import Broker, free_port, wait_port
from tests.helpers import build_slow, deploy, persistent_broker, reported, wait_state

KIB = 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4 MiB model (one 1024x1024 FP32 weight): x [1, 1] -> y [1, 1]."""
    return build_slow(tmp_path_factory.mktemp("big"), matmuls=1)


def _agent(tmp: Path, broker: Broker, device: str, **deploy_cfg: Any) -> AgentProcess:
    agent = AgentProcess(tmp / "agent", broker.url, device, deploy=deploy_cfg)
    agent.start()
    wait_state(broker.url, "online", device)
    return agent


def _status(url: str, device: str, name: str, version: str) -> dict[str, Any] | None:
    try:
        rep = reported(url, device)
    except Exception:  # the broker may be restarting
        return None
    for m in rep["models"]:
        if m["name"] == name and m["version"] == version:
            return dict(m)
    return None


def _wait_serving(url: str, device: str, name: str, version: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = _status(url, device, name, version)
        if last and last["state"] == "serving":
            return
        if last and last["state"] == "failed":
            raise AssertionError(f"{name}:{version} failed: {last['error']}")
        time.sleep(0.2)
    raise AssertionError(f"{name}:{version} not serving after {timeout}s: {last}")


def _wait_offset(server: ChunkServer, at_least: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(server.offsets_served(), default=-1) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"no request reached offset {at_least}: {server.offsets_served()}")


def _infer_big(url: str, device: str) -> float:
    with InferenceClient(url) as client:
        res = client.submit("big", {"x": np.ones((1, 1), np.float32)}, device=device,
                            timeout=30).result(60)
    return float(res.outputs["y"].ravel()[0])


def _local_big(path: Path) -> float:
    """What the model in `path` answers to the same request, run here on ONNX Runtime."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": np.ones((1, 1), np.float32)})
    return float(np.asarray(y).ravel()[0])


# --- URIs ----------------------------------------------------------------------------------


def test_mqtt_uri_form_is_checked() -> None:
    hexd = "ab" * 32

    def manifest(uri: str) -> bytes:
        return json.dumps({"revision": 1, "models": [
            {"name": "m", "version": "1", "uri": uri, "sha256": hexd, "size": 1}]}).encode()

    assert decode_manifest(manifest(mqtt_artifact_uri(hexd))).models[0].uri.startswith("mqtt:")
    for bad in (f"mqtt://broker/artifacts/sha256/{hexd}", "mqtt:///artifacts/sha256/abc",
                f"mqtt:///other/{hexd}"):
        with pytest.raises(ManifestError, match="mqtt:///artifacts/sha256"):
            decode_manifest(manifest(bad))
    assert parse_base_url("mqtt://") == "mqtt://"
    with pytest.raises(ValueError, match="mqtt://"):
        parse_base_url("mqtt://broker:1883")


# --- end to end ------------------------------------------------------------------------------


def test_deploy_over_mqtt_serves_and_a_corrupt_chunk_is_asked_again(
    broker: Broker, digits: DigitsModel, tmp_path: Path
) -> None:
    device = "gw-mqtt-art"
    agent = _agent(tmp_path, broker, device, mqtt_chunk_bytes=4096)
    size = digits.path.stat().st_size
    with ChunkServer(ArtifactStore(tmp_path / "artifacts"), broker.url) as server:
        server.corrupt_offsets = {8192}  # answered once with a byte flipped
        try:
            assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                          "--file", str(digits.path), "--artifact-base-url", "mqtt://",
                          "--wait", "60", device=device) == 0
            served = server.offsets_served()
            assert sorted(set(served)) == list(range(0, size, 4096))
            assert served.count(8192) == 2  # the corrupt one, asked again
            assert all(served.count(o) == 1 for o in set(served) - {8192})
            assert "corrupt chunk of mqtt:///artifacts/sha256/" in agent.log_text()
            status = _status(broker.url, device, "digits", "1")
            assert status is not None and status["state"] == "serving"
            with InferenceClient(broker.url) as client:
                futures = [client.submit("digits", {"x": digits.x_test[i:i + 1]}, device=device,
                                         timeout=30) for i in range(20)]
                labels = [int(f.result(30).outputs["label"][0]) for f in futures]
            np.testing.assert_array_equal(labels, digits.sklearn_pred[:20])
            # Nothing left behind in the partial downloads' folder.
            assert list((agent.state_dir / "tmp" / "mqtt").iterdir()) == []
        finally:
            agent.stop()


def test_wrong_sha256_is_refused_and_the_old_version_keeps_serving(
    broker: Broker, digits: DigitsModel, tmp_path: Path
) -> None:
    device = "gw-mqtt-sha"
    agent = _agent(tmp_path, broker, device, mqtt_chunk_bytes=8192)
    store = ArtifactStore(tmp_path / "artifacts")
    with ChunkServer(store, broker.url) as server:
        try:
            assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                          "--file", str(digits.path), "--artifact-base-url", "mqtt://",
                          "--wait", "60", device=device) == 0
            artifact = store_artifact(digits.path, store)
            good = model_spec(name="digits", version="2", artifact=artifact,
                              uri=mqtt_artifact_uri(artifact.sha256))
            bad = msgspec.structs.replace(good, sha256="0" * 64)
            before = len(server.offsets_served())
            with connect(broker.url) as conn:
                outcome = deploy_spec(conn, Topics("edge/v1", device), upsert=bad, wait_s=60)
            assert outcome.wait is not None and not outcome.wait.ok
            assert len(server.offsets_served()) > before  # it was downloaded, then refused
            v2 = _status(broker.url, device, "digits", "2")
            assert v2 is not None and v2["state"] == "failed"
            assert "sha256" in v2["error"] and "0" * 64 in v2["error"]
            v1 = _status(broker.url, device, "digits", "1")
            assert v1 is not None and v1["state"] == "serving"
            with InferenceClient(broker.url) as client:
                res = client.submit("digits", {"x": digits.x_test[:1]}, device=device,
                                    timeout=30).result(30)
            assert res.model_version == "1"
            assert list((agent.state_dir / "tmp" / "mqtt").iterdir()) == []
            assert not (agent.state_dir / "models" / "sha256" / ("0" * 64)).exists()
        finally:
            agent.stop()


def test_broker_restart_mid_download_resumes_from_its_offset(
    tmp_path: Path, big: Path
) -> None:
    device = "gw-mqtt-resume"
    broker = persistent_broker(tmp_path / "broker")
    broker.start()
    agent = None
    server = ChunkServer(ArtifactStore(tmp_path / "artifacts"), broker.url)
    try:
        agent = _agent(tmp_path, broker, device, mqtt_chunk_bytes=64 * KIB,
                       mqtt_max_bytes_per_s=1 * MIB, mqtt_chunk_timeout_s=2)
        server.start()
        assert deploy(broker.url, tmp_path, "--model", "big", "--version", "1",
                      "--file", str(big), "--artifact-base-url", "mqtt://", device=device) == 0
        _wait_offset(server, 1 * MIB)
        before = server.offsets_served()
        broker.restart()
        _wait_serving(broker.url, device, "big", "1", timeout=60)
        after = server.offsets_served()[len(before):]
        size = big.stat().st_size
        assert after, "nothing was requested after the restart"
        # Resumed: nothing below what had been reached was asked for again, 0 least of all.
        assert min(after) >= 512 * KIB, (min(after), before[-8:], after[:8])
        assert sorted(set(before) | set(after)) == list(range(0, size, 64 * KIB))
        assert before.count(0) == 1 and 0 not in after
        # The resumed file is the whole model: the agent answers as the model does here.
        assert _infer_big(broker.url, device) == pytest.approx(_local_big(big), rel=1e-4,
                                                               abs=1e-5)
    finally:
        server.stop()
        if agent is not None:
            agent.stop()
        broker.stop()


def test_agent_restart_mid_download_resumes_from_the_kept_part(
    broker: Broker, tmp_path: Path, big: Path
) -> None:
    device = "gw-mqtt-restart"
    agent = _agent(tmp_path, broker, device, mqtt_chunk_bytes=64 * KIB,
                   mqtt_max_bytes_per_s=1 * MIB)
    with ChunkServer(ArtifactStore(tmp_path / "artifacts"), broker.url) as server:
        try:
            assert deploy(broker.url, tmp_path, "--model", "big", "--version", "1",
                          "--file", str(big), "--artifact-base-url", "mqtt://",
                          device=device) == 0
            sha = store_artifact(big, ArtifactStore(tmp_path / "artifacts")).sha256
            recorded = agent.state_dir / "tmp" / "mqtt" / f"{sha}.offset"
            deadline = time.monotonic() + 30
            while not (recorded.exists() and int(recorded.read_text() or 0) >= 1 * MIB):
                assert time.monotonic() < deadline, "no offset of 1 MiB recorded"
                time.sleep(0.02)
            reached = int(recorded.read_text())  # it only grows until the kill
            agent.kill()
            before = server.offsets_served()
            agent.start()
            _wait_serving(broker.url, device, "big", "1", timeout=60)
            after = server.offsets_served()[len(before):]
            assert "resuming at offset" in agent.log_text()
            assert min(after) >= reached, (reached, min(after), after[:8])
        finally:
            agent.stop()


def test_rate_cap_holds(broker: Broker, tmp_path: Path, big: Path) -> None:
    device = "gw-mqtt-rate"
    cap, chunk = 2 * MIB, 128 * KIB
    agent = _agent(tmp_path, broker, device, mqtt_chunk_bytes=chunk, mqtt_chunks_in_flight=8,
                   mqtt_max_bytes_per_s=cap)
    size = big.stat().st_size
    with ChunkServer(ArtifactStore(tmp_path / "artifacts"), broker.url) as server:
        try:
            assert deploy(broker.url, tmp_path, "--model", "big", "--version", "1",
                          "--file", str(big), "--artifact-base-url", "mqtt://",
                          "--wait", "60", device=device) == 0
            with server._lock:
                times = [r.at for r in server.requests]
            span = times[-1] - times[0]
            floor = (size - chunk) / cap  # the last chunk's request may go at once
            print(f"{size} bytes at a cap of {cap} B/s: requests spanned {span:.2f}s "
                  f"(floor {floor:.2f}s)")
            assert span >= 0.95 * floor
            assert span <= 2.5 * floor  # the cap, not something else, set the pace
        finally:
            agent.stop()


def test_edge_fleet_serve_answers_chunks(broker: Broker, digits: DigitsModel,
                                         tmp_path: Path) -> None:
    device = "gw-mqtt-serve"
    port = free_port()
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(
        f"broker: {{url: '{broker.url}', client_id: ctl-art}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"artifact_dir: {tmp_path / 'artifacts'}\n"
        f"http: {{host: 127.0.0.1, port: {port}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_FLEET_")}
    proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.fleet.cli", "serve", "--config", str(cfg)],
                            cwd=Path(__file__).resolve().parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    agent = None
    try:
        wait_port(port, 10)
        agent = _agent(tmp_path, broker, device, mqtt_chunk_bytes=8192)
        assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                      "--file", str(digits.path), "--artifact-base-url", "mqtt://",
                      "--wait", "60", device=device) == 0
        assert "fetched mqtt:///artifacts/sha256/" in agent.log_text()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if agent is not None:
            agent.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "chunk server: mqtt:///artifacts/sha256/<hex> answered on edge/v1/artifacts/req" \
        in out.decode()


def test_no_chunk_server_fails_at_the_deadline(
    broker: Broker, digits: DigitsModel, tmp_path: Path
) -> None:
    device = "gw-mqtt-none"
    agent = _agent(tmp_path, broker, device, download_timeout_s=2)
    try:
        started = time.monotonic()
        assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                      "--file", str(digits.path), "--artifact-base-url", "mqtt://",
                      "--wait", "30", device=device) == 1
        assert time.monotonic() - started < 15
        status = _status(broker.url, device, "digits", "1")
        assert status is not None and status["state"] == "failed"
        assert "download_timeout_s=2s" in status["error"]
    finally:
        agent.stop()


def test_stopping_mid_download_is_prompt_and_keeps_the_part(
    broker: Broker, tmp_path: Path, big: Path
) -> None:
    device = "gw-mqtt-stop"
    agent = _agent(tmp_path, broker, device, mqtt_chunk_bytes=64 * KIB,
                   mqtt_max_bytes_per_s=1 * MIB)
    with ChunkServer(ArtifactStore(tmp_path / "artifacts"), broker.url) as server:
        try:
            assert deploy(broker.url, tmp_path, "--model", "big", "--version", "1",
                          "--file", str(big), "--artifact-base-url", "mqtt://",
                          device=device) == 0
            _wait_offset(server, 512 * KIB)
            started = time.monotonic()
            assert agent.stop() == 0
            assert time.monotonic() - started < 5
            assert "kept for resuming" in agent.log_text()
            parts = list((agent.state_dir / "tmp" / "mqtt").glob("*.part"))
            assert len(parts) == 1 and parts[0].stat().st_size > 0
        finally:
            agent.stop()
