"""Issue 12, points 5 and 6, through a real mosquitto and a real `edge-agent`:

- a job over jobs.max_message_bytes is refused INVALID_ARGUMENT to its reply topic before
  it is journaled or held whole (the session drops its payload unread), and acknowledged;
- a broker configured like deploy/mosquitto.conf (max_packet_size) refuses an oversized
  publish to its sender with reason 0x95;
- jobs a model cannot take (an empty batch, the wrong rank) are INVALID_ARGUMENT and never
  push the model off its runtime.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import mqtt5
import numpy as np
import pytest

from bench.models import build_mlp
from edgeinfer.agent.mqtt_wire import PUBLISH_HEAD_MAX
from edgeinfer.contract.topics import Topics
from edgeinfer.runtimes.base import BadInput, TensorSpec, check_request
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import PREFIX, Replies, Watch, deploy, job_body, reported, wait_state

LIMIT = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def padded(body: bytes, size: int) -> bytes:
    """`body` (a JSON job) padded with spaces to `size` bytes: still a valid job."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def state_files(state: Path) -> dict[str, int]:
    return {str(p.relative_to(state)): p.stat().st_size for p in state.rglob("*") if p.is_file()}


def test_a_job_over_the_limit_is_refused_unread_and_the_next_is_served(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")  # no max_packet_size: the agent is the one to refuse
    broker.start()
    device = "gw-limit"
    topics = Topics(PREFIX, device)
    agent = AgentProcess(tmp_path / "agent", broker.url, device, jobs={"max_message_bytes": LIMIT},
                         log={"level": "INFO"})
    agent.start()
    replies = Replies(broker.url)
    try:
        wait_state(broker.url, "online", device)
        assert deploy(broker.url, tmp_path, "--model", "mlp", "--version", "1", "--file",
                      str(build_mlp(tmp_path / "models")), "--prefer", "onnxruntime",
                      "--wait", "60", device=device) == 0
        x = {"x": np.ones((1, 64), np.float32)}
        spool = agent.state_dir / "journal.sqlite3.spool"
        before = sum(state_files(agent.state_dir).values())
        # Just over the limit: acknowledged (the PUBACK reaches the sender), answered.
        big = padded(job_body("big", "mlp", x), LIMIT + 1)
        replies.send(topics.jobs, big, b"big").result(timeout=20)
        (corr, answer, _), = replies.wait_count(1)
        assert corr == b"big"
        assert answer["parameters"]["code"] == "INVALID_ARGUMENT"
        assert f"{LIMIT + 1} bytes" in answer["error"] and str(LIMIT) in answer["error"]
        assert "jobs.max_message_bytes" in answer["error"]
        assert not list(spool.iterdir()), "the oversized job was spooled"
        after = sum(state_files(agent.state_dir).values())
        assert after - before < LIMIT // 4, f"state dir grew by {after - before} bytes"
        assert "dropping it unread" in agent.log_text()
        # At the limit exactly, and then a plain job: served.
        replies.send(topics.jobs, padded(job_body("edge", "mlp", x), LIMIT), b"edge")
        replies.send(topics.jobs, job_body("next", "mlp", x), b"next")
        replies.wait_count(3)
        got = replies.by_correlation()
        for key in (b"edge", b"next"):
            y = got[key][0]["outputs"][0]["data"]
            assert abs(sum(y) - 1.0) < 1e-4, got[key]
    finally:
        replies.close()
        agent.stop()
        broker.stop()


def deploy_conf_max_packet_size() -> int:
    """max_packet_size as deploy/mosquitto.conf sets it (the tests' broker copies it)."""
    for name in ("mosquitto.conf", "mosquitto-tls.conf"):
        text = (REPO / "deploy" / name).read_text()
        found = re.findall(r"^max_packet_size\s+(\d+)\s*$", text, re.MULTILINE)
        assert found, f"deploy/{name} sets no max_packet_size"
        value = int(found[0])
    return value


def test_deploy_brokers_packet_limit_matches_the_agents_default() -> None:
    from edgeinfer.agent.config import JobsConfig

    assert deploy_conf_max_packet_size() == JobsConfig().max_message_bytes + PUBLISH_HEAD_MAX


def test_a_broker_with_max_packet_size_refuses_an_oversized_publish_to_its_sender(
    tmp_path: Path,
) -> None:
    # As deploy/'s configs write it, for a limit of LIMIT.
    broker = Broker(tmp_path / "broker", extra_conf=f"max_packet_size {LIMIT + PUBLISH_HEAD_MAX}\n")
    broker.start()
    try:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
            sock.sendall(mqtt5.ConnectPacket("oversize-sender").write())
            connack, rest = read_packet(sock, b"")
            assert isinstance(connack, mqtt5.ConnAckPacket)
            # Only the PUBLISH's fixed and variable headers: the broker answers from its
            # Remaining Length, before any payload byte (a sender still writing the payload
            # could otherwise see a reset before it reads the DISCONNECT).
            head = mqtt5.PublishPacket(f"{PREFIX}/dev/any/jobs", b"", qos=mqtt5.QoS.AT_LEAST_ONCE,
                                       packet_id=1).write()
            body = head[2:]  # an empty payload's Remaining Length fits in one byte
            size = len(body) + LIMIT + PUBLISH_HEAD_MAX
            sock.sendall(bytes([head[0]]) + varint(size) + body)
            answer, _ = read_packet(sock, rest)
        assert isinstance(answer, mqtt5.DisconnectPacket), answer
        assert int(answer.reason_code) == 0x95  # Packet too large
    finally:
        broker.stop()


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_packet(sock: socket.socket, buf: bytes) -> tuple[Any, bytes]:
    while True:
        try:
            packet, n = mqtt5.read(memoryview(buf))
            return packet, buf[n:]
        except IndexError:
            data = sock.recv(65536)
            assert data, "the broker closed the connection without a word"
            buf += data


def test_client_errors_never_push_a_model_off_its_runtime(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    device = "gw-client-errors"
    topics = Topics(PREFIX, device)
    agent = AgentProcess(tmp_path / "agent", broker.url, device, runtime={"failover_after": 2},
                         log={"level": "INFO"})
    agent.start()
    events = Watch(broker.url, topics.events)
    replies = Replies(broker.url)
    try:
        wait_state(broker.url, "online", device)
        assert deploy(broker.url, tmp_path, "--model", "mlp", "--version", "1", "--file",
                      str(build_mlp(tmp_path / "models")), "--prefer", "openvino,onnxruntime",
                      "--wait", "60", device=device) == 0
        bad: list[tuple[str, dict[str, Any]]] = []
        for _ in range(3):
            bad.append(("empty", {"name": "x", "shape": [0, 64], "datatype": "FP32", "data": []}))
            bad.append(("rank", {"name": "x", "shape": [64], "datatype": "FP32",
                                 "data": [0.0] * 64}))
            bad.append(("dims", {"name": "x", "shape": [1, 63], "datatype": "FP32",
                                 "data": [0.0] * 63}))
            bad.append(("dtype", {"name": "x", "shape": [1, 64], "datatype": "INT32",
                                  "data": [0] * 64}))
        for i, (kind, tensor) in enumerate(bad):
            body = json.dumps({"id": f"b{i}", "model_name": "mlp", "inputs": [tensor]}).encode()
            replies.send(topics.jobs, body, f"{kind}{i}".encode())
            replies.wait_count(i + 1)
        answers = replies.by_correlation()
        for i, (kind, _) in enumerate(bad):
            (answer,) = answers[f"{kind}{i}".encode()]
            assert answer["parameters"]["code"] == "INVALID_ARGUMENT", answer
            want = {"empty": "dimension of 0", "rank": "has shape [64]", "dims": "has shape [1, 63]",
                    "dtype": "datatype INT32"}[kind]
            assert want in answer["error"], answer
        replies.send(topics.jobs, job_body("good", "mlp", {"x": np.ones((1, 64), np.float32)}),
                     b"good")
        replies.wait_count(len(bad) + 1)
        good = replies.by_correlation()[b"good"][0]
        assert good["parameters"]["runtime"] == "openvino", good
        time.sleep(1.0)
        assert not [t for t in events.types() if t.startswith("runtime_failover")]
        status = next(m for m in reported(broker.url, device)["models"] if m["name"] == "mlp")
        assert status["runtime"] == "openvino" and not status.get("failovers")
    finally:
        events.close()
        replies.close()
        agent.stop()
        broker.stop()


def test_check_request_raises_bad_input() -> None:
    specs = [TensorSpec("x", "FP32", (-1, 4))]
    with pytest.raises(BadInput):
        check_request(specs, [], {"x": np.ones((2, 3), np.float32)}, None)
    assert issubclass(BadInput, ValueError)  # callers that catch ValueError still do


def test_onnxruntime_invalid_argument_is_bad_input(tmp_path: Path) -> None:
    """A shape ORT refuses past check_request (a rank the runtime does not declare)."""
    from edgeinfer.runtimes.base import LoadOptions
    from edgeinfer.runtimes.onnxruntime_cpu import OnnxRuntimeCpuBackend

    session = OnnxRuntimeCpuBackend().load(build_mlp(tmp_path), "CPU", LoadOptions())
    # Declared rank unknown, so check_request lets the shape by and ORT itself refuses it.
    session.inputs = [TensorSpec("x", "FP32", ())]
    with pytest.raises(BadInput):
        session.infer({"x": np.ones((2, 3, 5), np.float32)})


def test_the_old_key_is_read_as_max_message_bytes(tmp_path: Path) -> None:
    from edgeinfer.agent.config import ConfigError, deprecations, load_config

    old = tmp_path / "old.yaml"
    old.write_text("jobs:\n  max_payload_bytes: 4096\n")
    assert load_config(old, environ={}).jobs.max_message_bytes == 4096
    assert "jobs.max_message_bytes" in deprecations(old)[0]
    both = tmp_path / "both.yaml"
    both.write_text("jobs:\n  max_payload_bytes: 4096\n  max_message_bytes: 8192\n")
    with pytest.raises(ConfigError, match=r"keep only jobs\.max_message_bytes"):
        load_config(both, environ={})
