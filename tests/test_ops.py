"""Operating the agent: telemetry, the Prometheus endpoint, `edge-agent doctor` and
`version`, and EDGE_AGENT_* overrides, against a real broker and real agent processes."""

from __future__ import annotations

import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.models import DigitsModel, build_digits
from edgeinfer.agent import __version__
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.mqtt import read_retained
from edgeinfer.runtimes.hardware import detect
from tests.agentproc import AgentProcess
from tests.broker import Broker, free_port
from tests.helpers import PREFIX, Replies, Watch, deploy, job_body, wait_state

DEVICE = "gw-ops"
TOPICS = Topics(PREFIX, DEVICE)
GOOD_JOBS = 5
BAD_JOBS = 2  # wrong input shape: INVALID_ARGUMENT, counted against the model


class Ops:
    def __init__(self, broker: Broker, agent: AgentProcess, prometheus_port: int) -> None:
        self.broker = broker
        self.agent = agent
        self.prometheus_port = prometheus_port

    @property
    def agent_pid(self) -> int:
        assert self.agent.proc is not None and self.agent.proc.poll() is None
        return self.agent.proc.pid


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    """One agent that has answered GOOD_JOBS digits jobs and refused BAD_JOBS; the tests
    of this module send it nothing more, so its figures are known exactly."""
    root = tmp_path_factory.mktemp("ops")
    digits: DigitsModel = build_digits(root / "models")
    broker = Broker(root / "broker")
    broker.start()
    port = free_port()
    agent = AgentProcess(root / "agent", broker.url, DEVICE,
                         telemetry={"interval_s": 0.5, "prometheus_port": port})
    agent.start()
    try:
        wait_state(broker.url, "online", DEVICE, timeout=20)
        assert deploy(broker.url, root, "--model", "digits", "--version", "1",
                      "--file", str(digits.path), "--prefer", "onnxruntime", "--wait", "30",
                      device=DEVICE) == 0
        replies = Replies(broker.url)
        try:
            for i in range(GOOD_JOBS):
                body = job_body(f"ok-{i}", "digits", {"x": digits.x_test[i:i + 1]})
                replies.send(TOPICS.jobs, body, uuid.uuid4().bytes).result(5)
            for i in range(BAD_JOBS):
                body = job_body(f"bad-{i}", "digits", {"x": digits.x_test[i:i + 1, :60]})
                replies.send(TOPICS.jobs, body, uuid.uuid4().bytes).result(5)
            answers = [a for _, a, _ in replies.wait_count(GOOD_JOBS + BAD_JOBS, timeout=20)]
        finally:
            replies.close()
        assert sum("outputs" in a for a in answers) == GOOD_JOBS
        assert sum(a.get("parameters", {}).get("code") == "INVALID_ARGUMENT"
                   for a in answers) == BAD_JOBS
        yield Ops(broker, agent, port)
    finally:
        agent.stop()
        broker.stop()


# --- telemetry ----------------------------------------------------------------------------


def test_telemetry_comes_every_interval_with_health_and_model_figures(ops: Ops) -> None:
    watch = Watch(ops.broker.url, TOPICS.telemetry)
    try:
        time.sleep(2.2)
        docs = watch.snapshot()
    finally:
        watch.close()
    # interval_s 0.5: four in 2.2 s, give or take one at either end.
    assert 3 <= len(docs) <= 6, [d["ts"] for d in docs]
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(docs)]
    assert 0.4 <= statistics.median(gaps) <= 0.8, gaps

    doc = docs[-1]
    health = doc["health"]
    assert 0 <= health["cpu_percent"] <= 100 * (os.cpu_count() or 1)
    assert health["memory"]["total"] == psutil.virtual_memory().total
    assert 0 < health["memory"]["available"] <= health["memory"]["total"]
    assert 0 <= health["memory"]["percent"] <= 100
    assert 0 < health["disk"]["free"] <= health["disk"]["total"]
    assert 0 <= health["disk"]["percent"] <= 100
    rss = psutil.Process(ops.agent_pid).memory_info().rss
    assert 10 * 2**20 < health["process"]["rss"] < 4 * rss  # the agent's own, not ours
    assert health["process"]["threads"] >= 3
    # Temperatures exactly when this host has sensors to read.
    reader = getattr(psutil, "sensors_temperatures", None)
    sensors: dict[str, list[Any]] = reader() if reader is not None else {}
    assert ("temperatures_c" in health) == any(sensors.values())
    if "temperatures_c" in health:
        assert all(isinstance(v, float) for v in health["temperatures_c"].values())

    assert doc["queue_depth"] == 0
    inference = doc["inference"]
    assert inference["jobs_ok"] == GOOD_JOBS
    assert inference["jobs_failed"] == BAD_JOBS
    assert inference["errors_by_code"] == {"INVALID_ARGUMENT": BAD_JOBS}
    digits = inference["models"]["digits:1"]
    assert digits["ok"] == GOOD_JOBS
    assert digits["errors"] == {"INVALID_ARGUMENT": BAD_JOBS}
    for figure in ("latency_ms", "infer_ms", "queue_ms"):
        p = digits[figure]
        assert set(p) == {"p50", "p95", "p99"}
        assert 0 <= p["p50"] <= p["p95"] <= p["p99"], (figure, p)
    assert digits["latency_ms"]["p50"] > 0
    assert digits["latency_ms"]["p99"] >= digits["infer_ms"]["p99"]


# --- Prometheus ---------------------------------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


def test_prometheus_endpoint_serves_the_figures_on_localhost_only(ops: Ops) -> None:
    m = _scrape(ops.prometheus_port)
    model = ("model", "digits:1")
    assert m[("edge_jobs_total", (model, ("outcome", "ok")))] == GOOD_JOBS
    assert m[("edge_jobs_total", (model, ("outcome", "INVALID_ARGUMENT")))] == BAD_JOBS
    assert m[("edge_queue_depth", ())] == 0
    p50 = m[("edge_job_latency_ms", (model, ("quantile", "p50")))]
    p99 = m[("edge_job_latency_ms", (model, ("quantile", "p99")))]
    assert 0 < p50 <= p99
    assert m[("edge_cpu_percent", ())] >= 0
    assert m[("edge_disk_free_bytes", ())] > 0

    # Bound to 127.0.0.1 itself, not to every address: the agent's listening socket says
    # so, and another loopback address (which a 0.0.0.0 bind would answer) is refused.
    agent = psutil.Process(ops.agent_pid)
    listening = [c.laddr for c in agent.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == ops.prometheus_port]
    assert [a.ip for a in listening] == ["127.0.0.1"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", ops.prometheus_port), timeout=2).close()


def test_a_busy_prometheus_port_does_not_take_the_agent_down(
    broker: Broker, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = AgentProcess(tmp_path / "agent", broker.url, "gw-busy-port",
                             telemetry={"interval_s": 0.5, "prometheus_port": port})
        agent.start()
        try:
            agent.wait_log(f"Prometheus endpoint on 127.0.0.1:{port} not started", timeout=20)
            wait_state(broker.url, "online", "gw-busy-port", timeout=10)
            telemetry = Watch(broker.url, Topics(PREFIX, "gw-busy-port").telemetry)
            try:
                assert telemetry.wait(3)["queue_depth"] == 0  # MQTT telemetry goes on
            finally:
                telemetry.close()
            assert agent.proc is not None and agent.proc.poll() is None
        finally:
            assert agent.stop() == 0


# --- doctor and version -------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeinfer.agent.cli", *args], capture_output=True,
                          text=True, timeout=60, env=_clean_env())


def _config(tmp: Path, **keys: Any) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump({"device_id": "gw-doctor", "state_dir": str(tmp / "state"),
                                    **keys}))
    return path


def test_doctor_tells_hardware_runtime_choices_and_that_the_broker_answers(
    broker: Broker, tmp_path: Path
) -> None:
    done = _cli("doctor", "--config", str(_config(tmp_path, broker={"url": broker.url})))
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    hw = detect()
    assert f"edge-agent {__version__}" in out
    assert "config: OK (device gw-doctor" in out
    assert f"'model': {hw.cpu_model!r}" in out
    assert f"'cores_logical': {hw.cores_logical}" in out
    # The default is auto-tune: what it would load and compare here, and what it skips.
    assert "runtime preference auto:" in out
    if not hw.nvidia_gpus:
        assert "auto: skipped: no NVIDIA GPU detected" in out
    assert "auto: loads, checks against ONNX Runtime CPU and times" in out
    assert "openvino on CPU" in out and "onnxruntime on CPU" in out
    # Which task pipelines can run here, and what a missing optional library costs.
    from edgeinfer.runtimes.pipelines import pipeline_requirements

    assert "task pipelines:" in out
    for task, missing in pipeline_requirements().items():
        assert (f"  {task}: ready" if missing is None else f"  {task}: unavailable: ") in out
    # A pinned list says, entry by entry, what it gets and why.
    pinned = _cli("doctor", "--config", str(_config(
        tmp_path, broker={"url": broker.url},
        runtime={"prefer": ["cuda", "openvino", "onnxruntime"]})))
    assert "runtime preference cuda, openvino, onnxruntime:" in pinned.stdout
    if not hw.nvidia_gpus:
        assert "cuda: skipped: no NVIDIA GPU" in pinned.stdout
    assert ("openvino: tries first openvino on CPU" in pinned.stdout
            or "openvino: falls back to openvino on CPU" in pinned.stdout)
    assert "onnxruntime: falls back to onnxruntime on CPU" in pinned.stdout
    assert f"broker {broker.url}: answers (Success)" in out


def test_doctor_fails_on_a_broker_nobody_answers(tmp_path: Path) -> None:
    closed = free_port()  # bound once, then released: nothing listens there
    done = _cli("doctor", "--config", str(_config(
        tmp_path, broker={"url": f"mqtt://127.0.0.1:{closed}"})))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"broker mqtt://127.0.0.1:{closed}: unreachable" in done.stdout
    assert "refused" in done.stdout.lower()


def test_doctor_refuses_an_unknown_runtime_in_the_config(tmp_path: Path) -> None:
    path = _config(tmp_path, runtime={"prefer": ["cuda", "tensorrtt"]})
    for args in (["doctor", "--config", str(path)],
                 ["run", "--config", str(path), "--validate-config"]):
        done = _cli(*args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "key 'runtime.prefer'" in done.stderr and "tensorrtt" in done.stderr
        assert "Traceback" not in done.stderr


def test_version_prints_the_version() -> None:
    done = _cli("version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"edge-agent {__version__}"
    script = Path(sys.executable).parent / "edge-agent"
    if script.exists():  # the console script of an installed package says the same
        out = subprocess.run([str(script), "version"], capture_output=True, text=True,
                             timeout=30, env=_clean_env())
        assert out.stdout.strip() == f"edge-agent {__version__}"


# --- EDGE_AGENT_* overrides ---------------------------------------------------------------


def test_environment_overrides_the_config_file_in_a_real_run(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()
    agent = AgentProcess(tmp_path / "agent", f"mqtt://127.0.0.1:{closed}", "gw-file",
                         telemetry={"interval_s": 60})
    env_state = tmp_path / "env-state"
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "gw-env")
    monkeypatch.setenv("EDGE_AGENT_BROKER__URL", broker.url)
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(env_state))
    monkeypatch.setenv("EDGE_AGENT_TELEMETRY__INTERVAL_S", "0.5")
    validated = subprocess.run(
        [sys.executable, "-m", "edgeinfer.agent.cli", "run", "--config", str(agent.config),
         "--validate-config"], capture_output=True, text=True, timeout=30)
    assert validated.returncode == 0, validated.stderr
    assert f"device gw-env, broker {broker.url}, state {env_state}" in validated.stdout

    agent.start()
    try:
        online = wait_state(broker.url, "online", "gw-env", timeout=20)
        assert online["session_id"]
        telemetry = Watch(broker.url, Topics(PREFIX, "gw-env").telemetry)
        try:
            time.sleep(1.3)
            assert len(telemetry.snapshot()) >= 2  # every 0.5 s, not the file's 60 s
        finally:
            telemetry.close()
        file_topics = Topics(PREFIX, "gw-file")
        assert read_retained(broker.url, [file_topics.state, file_topics.reported],
                             quiet_s=0.1, timeout_s=0.5) == {}
        assert env_state.is_dir() and any(env_state.iterdir())
        assert not agent.state_dir.exists()
    finally:
        agent.stop()
