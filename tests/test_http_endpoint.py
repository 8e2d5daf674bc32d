"""The local KServe v2 REST endpoint (issue 14, point 1: `http.listen`), driven by Triton's
own HTTP client, `tritonclient.http.InferenceServerClient`, unchanged.

One mosquitto and one edge-agent process serve the module's integration tests: the
endpoint on a free loopback port, jobs.max_message_bytes lowered to 100,000 (the body's
bound), and scikit-learn's digits MLP deployed through the fleet CLI; its metadata and
outputs are compared with what ONNX Runtime itself says of the same file and input.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import pytest

import edgeinfer
from bench.models import DigitsModel
from edgeinfer.agent.config import ConfigError, HttpConfig, load_config
from edgeinfer.agent.http_endpoint import HttpEndpoint
from edgeinfer.agent.http_endpoint.exchange import http_reply
from edgeinfer.agent.http_endpoint.server import SHUTDOWN_S
from edgeinfer.agent.local_replies import LocalReplies
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.protocol import HEADER_LENGTH_PROPERTY, encode_error
from edgeinfer.contract.errors import Code
from tests.broker import free_port, wait_port
from tests.helpers import deploy, running_agent

tc = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (dev group)")
from tritonclient.utils import InferenceServerException  # noqa: E402

DEVICE = "gw-http"
LIMIT = 100_000  # jobs.max_message_bytes: the request body's bound too
_OIP = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory, digits: DigitsModel) -> Iterator[Any]:
    """(tritonclient's client on the endpoint, the agent process, the endpoint's port,
    the broker)."""
    root = tmp_path_factory.mktemp("http")
    port = free_port()
    with running_agent(root, DEVICE, http={"listen": f"127.0.0.1:{port}"},
                       jobs={"max_message_bytes": LIMIT}) as (broker, agent):
        assert deploy(broker.url, root, "--model", "digits", "--version", "1", "--file",
                      str(digits.path), "--prefer", "onnxruntime", "--wait", "60",
                      device=DEVICE) == 0
        wait_port(port)
        client = tc.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=10,
                                          network_timeout=30)
        try:
            yield client, agent, port, broker
        finally:
            client.close()


@pytest.fixture(scope="module")
def reference(digits: DigitsModel) -> ort.InferenceSession:
    return ort.InferenceSession(str(digits.path), providers=["CPUExecutionProvider"])


def _tensors(args: list[Any]) -> list[dict[str, Any]]:
    return [{"name": a.name, "datatype": _OIP[a.type],
             "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]


# --- against a real agent -----------------------------------------------------------------


def test_health_and_readiness(endpoint: Any) -> None:
    client, _, _, _ = endpoint
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("digits") is True
    assert client.is_model_ready("digits", "1") is True
    assert client.is_model_ready("digits", "7") is False  # 404: no such version
    assert client.is_model_ready("nope") is False


def test_server_metadata_names_edgeinfer_and_its_extensions(endpoint: Any) -> None:
    client, _, _, _ = endpoint
    assert client.get_server_metadata() == {
        "name": "edgeinfer", "version": edgeinfer.__version__,
        "extensions": ["binary_tensor_data"]}


def test_model_metadata_is_what_onnx_runtime_says_of_the_file(
        endpoint: Any, reference: ort.InferenceSession) -> None:
    client, _, _, _ = endpoint
    meta = client.get_model_metadata("digits")
    assert meta == {"name": "digits", "versions": ["1"], "platform": "onnxruntime_onnx",
                    "inputs": _tensors(reference.get_inputs()),
                    "outputs": _tensors(reference.get_outputs())}
    assert client.get_model_metadata("digits", "1") == meta
    with pytest.raises(InferenceServerException, match="'nope' is not served here"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_gives_onnx_runtime_s_outputs(endpoint: Any, reference: ort.InferenceSession,
                                            digits: DigitsModel, binary: bool) -> None:
    client, _, _, _ = endpoint
    x = np.ascontiguousarray(digits.x_test[:5], dtype=np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    # JSON: every output named, as JSON; binary: none named, so tritonclient asks for
    # every output in the binary section (binary_data_output).
    outputs = None if binary else [tc.InferRequestedOutput(o.name, binary_data=False)
                                   for o in reference.get_outputs()]
    result = client.infer("digits", [inp], outputs=outputs, request_id=f"h-{binary}")
    response = result.get_response()
    assert response["id"] == f"h-{binary}" and response["model_name"] == "digits"
    assert all(("binary_data_size" in (o.get("parameters") or {})) == binary
               for o in response["outputs"])
    names = [o.name for o in reference.get_outputs()]
    want = dict(zip(names, reference.run(None, {"x": x}), strict=True))
    label = next(n for n in names if want[n].dtype == np.int64)
    np.testing.assert_array_equal(result.as_numpy(label), want[label])
    np.testing.assert_array_equal(result.as_numpy(label), digits.sklearn_pred[:5])
    for name in names:
        np.testing.assert_allclose(result.as_numpy(name), want[name], rtol=1e-5, atol=1e-6)


def test_unknown_model_is_the_client_s_error_naming_it(endpoint: Any) -> None:
    client, _, _, _ = endpoint
    inp = tc.InferInput("x", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException, match="model 'nope' is not served here"):
        client.infer("nope", [inp])


def test_a_body_over_the_limit_is_refused_unread(endpoint: Any) -> None:
    client, _, _, _ = endpoint
    x = np.zeros((400, 64), np.float32)  # 102,400 bytes of tensor alone
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match=r"over this agent's limit of 100000 "
                       r"bytes \(jobs.max_message_bytes\)"):
        client.infer("digits", [inp])
    assert client.is_server_live() is True  # and the endpoint still serves


def test_the_agent_listens_on_the_configured_port_only(endpoint: Any) -> None:
    _, agent, port, _ = endpoint
    listening = {c.laddr for c in psutil.Process(agent.proc.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", port)}


def test_answers_need_no_broker(endpoint: Any, reference: ort.InferenceSession,
                                digits: DigitsModel) -> None:
    client, agent, _, broker = endpoint
    broker.kill()
    try:
        agent.wait_log("event broker_disconnected")
        x = np.ascontiguousarray(digits.x_test[5:8], dtype=np.float32)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("digits", [inp])
        want = reference.run(None, {"x": x})
        for name, value in zip([o.name for o in reference.get_outputs()], want, strict=True):
            np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
        assert client.is_model_ready("digits") is True
    finally:
        broker.start()


# --- what the endpoint makes of an answer, and its config ---------------------------------


@pytest.mark.parametrize(("code", "status"), [
    (Code.INVALID_ARGUMENT, 400), (Code.NOT_FOUND, 404), (Code.RESOURCE_EXHAUSTED, 503),
    (Code.UNAVAILABLE, 503), (Code.DEADLINE_EXCEEDED, 504), (Code.INTERNAL, 500)])
def test_an_error_answer_keeps_its_bytes_and_gets_its_code_s_status(code: Code,
                                                                      status: int) -> None:
    body = encode_error("j", code, "why")
    reply = http_reply(body, ())
    assert (reply.status, reply.body, reply.headers["Content-Type"]) == (
        status, body, "application/json")


def test_ready_false_is_400_and_a_binary_answer_carries_its_header_length() -> None:
    assert http_reply(b'{"name":"m","ready":false}', ()).status == 400
    assert http_reply(b'{"name":"m","ready":true}', ()).status == 200
    reply = http_reply(b'{"outputs":[]}\x00\x01', ((HEADER_LENGTH_PROPERTY, "14"),))
    assert (reply.status, reply.headers[HEADER_LENGTH_PROPERTY]) == (200, "14")
    assert reply.body == b'{"outputs":[]}\x00\x01'


def test_the_endpoint_is_off_by_default() -> None:
    assert load_config(None, {}).http.listen == ""


@pytest.mark.parametrize(("listen", "why"), [
    ("8000", "must be host:port"), ("gateway:8000", "is no IP address"),
    ("127.0.0.1:0", "the port must be 1-65535"), ("127.0.0.1:http", "the port must be")])
def test_a_bad_listen_address_names_the_key(tmp_path: Path, listen: str, why: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"http:\n  listen: '{listen}'\n")
    with pytest.raises(ConfigError, match=rf"key 'http.listen': .*{why}"):
        load_config(path, {})


def test_ipv6_loopback_and_a_bad_bound_are_read(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("http:\n  listen: '[::1]:8000'\n  max_concurrent: 8\n")
    cfg = load_config(path, {})
    assert (cfg.http.listen, cfg.http.max_concurrent) == ("[::1]:8000", 8)
    path.write_text("http:\n  request_timeout_s: 0\n")
    with pytest.raises(ConfigError, match=r"http\.request_timeout_s"):
        load_config(path, {})


# --- the server's own bounds, in-process (the job path a fake at its seam) ----------------


class FakeJobPath:
    """The scheduler's seam: takes what the endpoint submits; answers only when told."""

    def __init__(self, local: LocalReplies) -> None:
        self.local = local
        self.taken: list[Inbound] = []
        self.arrived = threading.Event()
        self.taking = True

    def submit(self, inbound: Inbound) -> None:
        self.taken.append(inbound)
        self.arrived.set()

    def answer(self, payload: bytes, props: tuple[tuple[str, str], ...] = ()) -> None:
        topic = self.taken[-1].response_topic
        assert topic is not None
        self.local.deliver(topic, payload, props)


@contextmanager
def bare_endpoint(**http: Any) -> Iterator[tuple[FakeJobPath, int, HttpEndpoint]]:
    port = free_port()
    local = LocalReplies()
    jobs = FakeJobPath(local)
    cfg = HttpConfig(listen=f"127.0.0.1:{port}", **http)
    endpoint = HttpEndpoint(cfg, 1000, jobs.submit, lambda: jobs.taking, local, "p/dev/d/jobs")
    endpoint.start()
    try:
        yield jobs, port, endpoint
    finally:
        endpoint.stop()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_request_past_max_concurrent_is_refused_at_once() -> None:
    with bare_endpoint(max_concurrent=1) as (jobs, port, _), \
            ThreadPoolExecutor(1) as pool:
        first = pool.submit(_get, port, "/v2/models/m")
        assert jobs.arrived.wait(10)
        status, body = _get(port, "/v2/health/live")
        assert status == 503 and b"http.max_concurrent" in body
        jobs.answer(b'{"name":"m","versions":["1"],"platform":"x","inputs":[],"outputs":[]}')
        assert first.result(10)[0] == 200
        jobs.arrived.clear()
        later = pool.submit(_get, port, "/v2/health/live")  # room again
        assert jobs.arrived.wait(10)
        jobs.answer(b'{"live":true}')
        assert later.result(10) == (200, b'{"live":true}')
    # What went to the job path: the queries, as an MQTT client's would be.
    kinds = [dict(i.user_properties)["oip_request"] for i in jobs.taken]
    assert kinds == ["ModelMetadata", "ServerLive"]
    assert all(i.response_topic and LocalReplies.is_local(i.response_topic) for i in jobs.taken)


def test_no_answer_within_the_timeout_is_504_and_a_late_one_is_dropped() -> None:
    with bare_endpoint(request_timeout_s=0.3) as (jobs, port, _):
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        inp = tc.InferInput("x", [1, 2], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 2), np.float32))
        with pytest.raises(InferenceServerException, match=r"http\.request_timeout_s"):
            client.infer("m", [inp])
        client.close()
        job = jobs.taken[-1]
        props = dict(job.user_properties)
        assert props["model_name"] == "m" and int(props[HEADER_LENGTH_PROPERTY]) > 0
        assert job.expiry_s == 1  # the job's deadline is the request's
        jobs.answer(b'{"outputs":[]}')
        assert jobs.local.dropped == 1


def test_a_draining_agent_refuses_inference_at_once() -> None:
    with bare_endpoint() as (jobs, port, _):
        jobs.taking = False
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v2/models/m/infer", body=b"{}")
        response = conn.getresponse()
        assert response.status == 503 and b"stopping" in response.read()
        conn.close()
        assert jobs.taken == []


def test_a_taken_address_is_an_oserror_at_start() -> None:
    with bare_endpoint() as (_, port, _), pytest.raises(OSError):
        HttpEndpoint(HttpConfig(listen=f"127.0.0.1:{port}"), 1000, lambda i: None,
                     lambda: True, LocalReplies(), "t").start()


def test_stop_gives_a_request_in_hand_a_moment_then_closes_it() -> None:
    with bare_endpoint() as (jobs, port, endpoint), ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_get, port, "/v2/health/ready")
        assert jobs.arrived.wait(10)
        t0 = time.monotonic()
        endpoint.stop()
        assert time.monotonic() - t0 < 2 * SHUTDOWN_S + 1.0
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            waiting.result(10)
