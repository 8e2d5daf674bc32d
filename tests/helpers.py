"""Helpers shared by the tests: watch a topic, read an agent's retained state, deploy through
the real fleet CLI; model builders; BYTES inputs (encoded images) for the pipeline tests."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.mqtt import Connection, connect, new_client_id, read_retained
from tests.broker import Broker

PREFIX = "edge/v1"


def wait_state(url: str, want: str, device: str, timeout: float = 30.0) -> dict[str, Any]:
    """The device's retained `state` once it says `want`; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        got = read_retained(url, [Topics(PREFIX, device).state], quiet_s=0.1, timeout_s=1)
        for payload in got.values():
            last = json.loads(payload)
            if last.get("state") == want:
                return last
        time.sleep(0.1)
    raise AssertionError(f"state never became {want!r}; last: {last}")


def reported(url: str, device: str) -> dict[str, Any]:
    got = read_retained(url, [Topics(PREFIX, device).reported], quiet_s=0.1, timeout_s=2)
    assert got, "no retained reported state"
    return dict(json.loads(next(iter(got.values()))))


def persistent_broker(workdir: Path, extra_conf: str = "") -> Broker:
    """A broker that keeps sessions and retained messages across restarts."""
    return Broker(workdir, persistence=True, extra_conf=extra_conf)


def build_slow(out_dir: Path, matmuls: int = 32, size: int = 1024) -> Path:
    """x FP32 [1, 1] -> Expand to [size, size] -> `matmuls` x MatMul -> ReduceMean -> y [1, 1].

    About 6 ms per 1024x1024 MatMul on a recent x86 core pair: ~0.2 s a job by default, slow
    enough for queues to fill, small enough as a request (one number).
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([size, size], np.int64), "shape")]
    nodes = [helper.make_node("Expand", ["x", "shape"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]) for i in range(matmuls)]
    nodes.append(helper.make_node("ReduceMean", [f"h{matmuls}"], ["y"], keepdims=1))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "slow.onnx"
    onnx.save(model, str(path))
    return path


def blobs(*items: bytes) -> np.ndarray:
    """A BYTES input: one encoded file (image, audio) per row, as a numpy object array."""
    return np.array(list(items), dtype=object)


def to_png(pixels: np.ndarray, mode: str = "L") -> bytes:
    """`pixels` (rounded to uint8) as a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def deploy(url: str, tmp: Path, *args: str, device: str) -> int:
    return fleet(["deploy", "--broker", url, "--device", device,
                  "--artifact-dir", str(tmp / "artifacts"), *args])


def http_request(server: Any, path: str, headers: dict[str, str] | None = None,
                 method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to a server of ours listening at `server.server_address`: the
    status, the headers and the body."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class Watch:
    """Every JSON message on one topic while the test watches."""

    def __init__(self, url: str, topic: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.arrived = threading.Event()
        self.conn: Connection = connect(url)
        self.conn.subscribe(topic, self._on)

    def _on(self, msg: Any) -> None:
        with self._lock:
            self.messages.append(json.loads(msg.payload))
        self.arrived.set()

    def wait(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.arrived.wait(timeout), "nothing arrived"
        self.arrived.clear()
        with self._lock:
            return self.messages[-1]

    def wait_for(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        """The first message (seen so far or arriving) for which `pred(message)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for m in self.messages:
                    if pred(m):
                        return m
            left = deadline - time.monotonic()
            assert left > 0, f"no matching message within {timeout}s; got {self.messages}"
            self.arrived.wait(min(left, 0.1))
            self.arrived.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def types(self) -> list[str]:
        with self._lock:
            return [e["type"] for e in self.messages]

    def close(self) -> None:
        self.conn.close()


# --- jobs without the SDK: exact control over properties, every answer counted ------------


def job_body(job_id: str, model: str, inputs: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """An OIP v2 request with FP32 JSON tensors."""
    return json.dumps({
        "id": job_id, "model_name": model,
        "inputs": [{"name": name, "shape": list(a.shape), "datatype": "FP32",
                    "data": a.astype(np.float32).ravel().tolist()} for name, a in inputs.items()],
    }).encode()


class Replies:
    """A reply topic under `edge/v1/reply/` and every answer that reaches it, timed."""

    def __init__(self, url: str) -> None:
        self.topic = f"{PREFIX}/reply/{new_client_id('test')}/res"
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # (correlation data, response JSON, time.monotonic() on arrival)
        self.answers: list[tuple[bytes, dict[str, Any], float]] = []
        self.conn: Connection = connect(url)
        self.conn.subscribe(self.topic, self._on)

    def _on(self, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        with self._cond:
            self.answers.append((correlation, json.loads(msg.payload), time.monotonic()))
            self._cond.notify_all()

    def send(self, jobs_topic: str, body: bytes, correlation: bytes) -> Future[None]:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        return self.conn.publish(jobs_topic, body, qos=1, properties=props)

    def wait_count(self, n: int, timeout: float = 20.0) -> list[tuple[bytes, dict[str, Any], float]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.answers) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.answers)} of {n} answers after {timeout}s"
                self._cond.wait(left)
            return list(self.answers)

    def by_correlation(self) -> dict[bytes, list[dict[str, Any]]]:
        out: dict[bytes, list[dict[str, Any]]] = {}
        with self._lock:
            for correlation, answer, _ in self.answers:
                out.setdefault(correlation, []).append(answer)
        return out

    def close(self) -> None:
        self.conn.close()


@contextmanager
def running_agent(root: Path, device: str, **overrides: Any) -> Iterator[tuple[Broker, Any]]:
    """A fresh broker and a real agent on it, online; both stopped on the way out."""
    from tests.agentproc import AgentProcess

    broker = Broker(root / "broker")
    broker.start()
    agent = AgentProcess(root / "agent", broker.url, device, **overrides)
    agent.start()
    try:
        wait_state(broker.url, "online", device)
        yield broker, agent
    finally:
        agent.stop()
        broker.stop()
