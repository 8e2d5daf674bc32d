"""The client SDK against a real agent: `AsyncInferenceClient`, and OIP bodies built by
tritonclient (the reference OIP client library) published unchanged.

One mosquitto and one edge-agent process serve the module; the model is bench's MLP
(x FP32 [N, 64] -> y FP32 [N, 10]) pinned to ONNX Runtime, compared with an
onnxruntime session run here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.models import build_mlp
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.client import (
    AsyncInferenceClient,
    InferenceClient,
    InvalidArgument,
    NotFound,
)
from edgeinfer.fleet.mqtt import Connection, connect, new_client_id
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY
from tests.broker import Broker
from tests.helpers import PREFIX, deploy, running_agent

DEVICE = "gw-sdk"
MODEL = "mlp"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path]]:
    root = tmp_path_factory.mktemp("sdk")
    with running_agent(root, DEVICE) as (broker, _):
        mlp = build_mlp(root / "models")
        assert deploy(broker.url, root, "--model", MODEL, "--version", "1", "--file", str(mlp),
                      "--prefer", "onnxruntime", "--wait", "60", device=DEVICE) == 0
        yield broker, mlp


@pytest.fixture(scope="module")
def reference(stack: tuple[Broker, Path]) -> ort.InferenceSession:
    return ort.InferenceSession(str(stack[1]), providers=["CPUExecutionProvider"])


def _expected(session: ort.InferenceSession, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray(session.run(["y"], {"x": x})[0])


# --- AsyncInferenceClient ---------------------------------------------------------------


def test_async_client_runs_200_jobs_at_once_without_blocking_the_loop(
    stack: tuple[Broker, Path], reference: ort.InferenceSession
) -> None:
    broker, _ = stack
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((2, 64)).astype(np.float32) for _ in range(200)]

    async def main() -> tuple[list[Any], float, float, int, int]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            # The loop must stay responsive while 200 jobs are sent and answered.
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with AsyncInferenceClient(broker.url) as client:
            tick = asyncio.create_task(ticker())
            await client.infer(MODEL, {"x": xs[0]}, device=DEVICE)  # warm the path
            t0 = time.perf_counter()
            jobs = asyncio.gather(
                *(client.infer(MODEL, {"x": x}, device=DEVICE, job_id=f"aj-{i}", timeout=30)
                  for i, x in enumerate(xs))
            )
            await asyncio.sleep(0)  # every job task has run up to its first await
            peak = client.in_flight
            results = await jobs
            elapsed = time.perf_counter() - t0
            left = client.in_flight
            stop.set()
            await tick
        return results, elapsed, max(gaps), peak, left

    results, elapsed, worst_gap, peak, left = asyncio.run(main())
    print(f"\n200 async jobs in {elapsed * 1000:.0f} ms, {peak} in flight at once; longest "
          f"event-loop stall {worst_gap * 1000:.1f} ms")
    # All sent before any answer was awaited: one connection, many jobs in flight.
    assert peak >= 100
    assert left == 0
    # Sending 200 jobs costs the loop CPU time (encoding), never a wait on the network.
    assert worst_gap < 0.5
    for i, (x, r) in enumerate(zip(xs, results, strict=True)):
        assert r.id == f"aj-{i}"
        assert r.model_name == MODEL
        assert r.parameters["runtime"] == "onnxruntime"
        assert r.outputs["y"].dtype == np.float32
        np.testing.assert_allclose(r.outputs["y"], _expected(reference, x), rtol=1e-5, atol=1e-6)
        # Binary tensors on the wire (both ways) by default.
        assert r.raw["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4


def test_async_client_raises_typed_errors(stack: tuple[Broker, Path]) -> None:
    broker, _ = stack
    x = np.zeros((1, 64), np.float32)

    async def main() -> list[Any]:
        async with AsyncInferenceClient(broker.url) as client:
            with pytest.raises(NotFound) as not_found:
                await client.infer("nope", {"x": x}, device=DEVICE, job_id="nf-1")
            assert not_found.value.job_id == "nf-1"
            with pytest.raises(InvalidArgument, match="shape"):
                await client.infer(MODEL, {"x": np.zeros((1, 63), np.float32)}, device=DEVICE)
            with pytest.raises(InvalidArgument, match="datatype"):
                await client.infer(MODEL, {"x": np.zeros((1, 64), np.float64)}, device=DEVICE,
                                   binary=False)
            with pytest.raises(TimeoutError, match=r"no response within 0\.5s"):
                await client.infer(MODEL, {"x": x}, device="gw-absent", timeout=0.5)
            with pytest.raises(ValueError, match="exactly one"):
                await client.infer(MODEL, {"x": x})
            # Mixed outcomes side by side: each job gets its own answer.
            return list(await asyncio.gather(
                client.infer(MODEL, {"x": x}, device=DEVICE),
                client.infer("nope", {"x": x}, device=DEVICE),
                client.infer(MODEL, {"x": x}, device=DEVICE, binary=False),
                return_exceptions=True,
            ))

    ok, missing, ok_json = asyncio.run(main())
    assert ok.outputs["y"].shape == (1, 10)
    assert isinstance(missing, NotFound)
    np.testing.assert_array_equal(ok_json.outputs["y"], ok.outputs["y"])


def test_async_and_sync_streams_of_a_non_streaming_agent_have_one_response(
    stack: tuple[Broker, Path],
) -> None:
    broker, _ = stack
    x = np.ones((1, 64), np.float32)

    async def main() -> list[Any]:
        async with AsyncInferenceClient(broker.url) as client:
            return [r async for r in client.stream(MODEL, {"x": x}, device=DEVICE)]

    parts = asyncio.run(main())
    assert len(parts) == 1 and parts[0].outputs["y"].shape == (1, 10)
    with InferenceClient(broker.url) as client:
        assert [r.outputs["y"].shape for r in client.stream(MODEL, {"x": x}, device=DEVICE)] == [
            (1, 10)]


# --- tritonclient's bodies, unchanged -----------------------------------------------------


class RawReplies:
    """Every response on one reply topic, as raw bytes with its user properties."""

    def __init__(self, url: str) -> None:
        self.topic = f"{PREFIX}/reply/{new_client_id('triton')}/res"
        self._cond = threading.Condition()
        self.got: dict[bytes, tuple[bytes, dict[str, str]]] = {}
        self.conn: Connection = connect(url)
        self.conn.subscribe(self.topic, self._on)

    def _on(self, msg: Any) -> None:
        props = msg.properties
        with self._cond:
            self.got[bytes(props.CorrelationData)] = (
                bytes(msg.payload), dict(getattr(props, "UserProperty", None) or []))
            self._cond.notify_all()

    def ask(self, body: bytes, header_length: int | None, model: str,
            timeout: float = 10.0) -> tuple[bytes, dict[str, str]]:
        """Publish `body` as a job naming `model` by user property; its raw response."""
        correlation = new_client_id("c").encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        user = [("model_name", model)]  # tritonclient's body does not name the model
        if header_length is not None:
            user.append((HEADER_LENGTH_PROPERTY, str(header_length)))
        props.UserProperty = user
        self.conn.publish(Topics(PREFIX, DEVICE).jobs, body, qos=1,
                          properties=props).result(5)
        with self._cond:
            assert self._cond.wait_for(lambda: correlation in self.got, timeout), "no answer"
            return self.got[correlation]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def raw_replies(stack: tuple[Broker, Path]) -> Iterator[RawReplies]:
    r = RawReplies(stack[0].url)
    try:
        yield r
    finally:
        r.close()


def _triton_parse(payload: bytes, props: dict[str, str]) -> Any:
    from tritonclient.http import InferResult

    length = props.get(HEADER_LENGTH_PROPERTY)
    return InferResult.from_response_body(
        payload, header_length=int(length) if length is not None else None)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_request_is_answered_and_its_parser_reads_the_response(
    raw_replies: RawReplies, reference: ort.InferenceSession, binary: bool
) -> None:
    tc = pytest.importorskip("tritonclient.http")
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = tc.InferRequestedOutput("y", binary_data=binary)
    body, header_length = tc.InferenceServerClient.generate_request_body(
        [inp], outputs=[out], request_id=f"tc-{'bin' if binary else 'json'}")
    assert (header_length is not None) == binary

    payload, props = raw_replies.ask(body, header_length, MODEL)

    assert (HEADER_LENGTH_PROPERTY in props) == binary
    result = _triton_parse(payload, props)
    response = result.get_response()
    assert "error" not in response, response
    assert response["id"] == f"tc-{'bin' if binary else 'json'}"
    assert response["model_name"] == MODEL
    y = result.as_numpy("y")
    assert y.dtype == np.float32 and y.shape == (3, 10)
    np.testing.assert_allclose(y, _expected(reference, x), rtol=1e-5, atol=1e-6)


def test_tritonclient_defaults_and_triton_parameters(
    raw_replies: RawReplies, reference: ort.InferenceSession
) -> None:
    tc = pytest.importorskip("tritonclient.http")
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    inp = tc.InferInput("x", [1, 64], "FP32")
    inp.set_data_from_numpy(x)  # binary by default
    # No outputs named: tritonclient asks for every output, binary (binary_data_output).
    # priority (lower first, as in Triton) and timeout (microseconds) ride along.
    body, header_length = tc.InferenceServerClient.generate_request_body(
        [inp], priority=1, timeout=2_000_000)
    payload, props = raw_replies.ask(body, header_length, MODEL)
    result = _triton_parse(payload, props)
    assert "error" not in result.get_response(), result.get_response()
    assert "id" not in result.get_response()  # no request_id, no id in the answer
    np.testing.assert_allclose(result.as_numpy("y"), _expected(reference, x), rtol=1e-5,
                               atol=1e-6)


def test_tritonclient_sees_an_error_body_for_a_bad_request(raw_replies: RawReplies) -> None:
    tc = pytest.importorskip("tritonclient.http")
    inp = tc.InferInput("x", [1, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 63), np.float32), binary_data=False)
    body, header_length = tc.InferenceServerClient.generate_request_body([inp],
                                                                        request_id="tc-bad")
    payload, props = raw_replies.ask(body, header_length, MODEL)
    response = _triton_parse(payload, props).get_response()
    assert response["id"] == "tc-bad"
    assert response["parameters"]["code"] == "INVALID_ARGUMENT"
    assert "shape" in response["error"]
