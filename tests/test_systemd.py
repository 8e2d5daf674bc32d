"""Running under systemd, with a real agent: READY=1 only once serving, WATCHDOG=1 while
healthy and withheld when the job loop stalls, STOPPING=1 and the drain on SIGTERM, SIGHUP's
reload.

A real mosquitto and a real edge-agent process; a unix datagram socket bound by the test
stands in for systemd's $NOTIFY_SOCKET. The job loop is stalled for real, with a model
whose inference runs as long as the job asks (an ONNX Loop of n MatMul+Tanh steps).
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from bench.models import IR_VERSION, OPSET, build_mlp
from edgeinfer.fleet.client import InferenceClient, InferResult
from edgeinfer.fleet.errors import NotFound
from tests.agentproc import AgentProcess
from tests.broker import Broker, free_port
from tests.helpers import deploy, wait_state

# --- helpers ------------------------------------------------------------------------------


def build_spin(out_dir: Path) -> Path:
    """x FP32 [1, 64], n INT64 scalar -> y FP32 [1, 64]: n steps of y = tanh(y @ W).

    A job sets its own run time with n (about a microsecond a step on a desktop core);
    the agent's warm-up sends n = 0.
    """
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["m"]),
         helper.make_node("Tanh", ["m"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 64])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "spin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model, full_check=True)
    path = out_dir / "spin.onnx"
    onnx.save(model, str(path))
    return path


def spin_inputs(steps: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.full((1, 64), 0.5, np.float32), "n": np.array(steps, np.int64)}


class NotifySocket:
    """What systemd would receive: every datagram, when it came, and the agent's log then."""

    def __init__(self, snapshot: Callable[[], str] = str) -> None:
        # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
        self.dir = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
        self.path = self.dir / "notify"
        self._snapshot = snapshot
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str], str]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields, self._snapshot()))

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def all(self) -> list[tuple[float, dict[str, str], str]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0,
                 since: float = 0.0) -> tuple[float, dict[str, str], str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.all():
                if msg[0] >= since and key in msg[1] and (value is None or msg[1][key] == value):
                    return msg
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value} on the notify socket; got {self.all()}")

    def pings(self, start: float, end: float) -> int:
        return sum(1 for t, f, _ in self.all() if start <= t < end and f.get("WATCHDOG") == "1")

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        self._thread.join(2)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def spin_model(tmp_path: Path) -> Path:
    return build_spin(tmp_path)


def calibrate(client: InferenceClient, device: str, seconds: float) -> int:
    """Steps of the spin model that take about `seconds` on this machine."""
    probe = 200_000
    result = client.infer("spin", spin_inputs(probe), device=device, timeout=60)
    per_step_ms = max(float(result.parameters["infer_ms"]), 1.0) / probe
    return max(1000, int(seconds * 1000.0 / per_step_ms))


def start_with_spin(tmp_path: Path, broker: Broker, spin: Path, device: str,
                    env: dict[str, str], **overrides: Any) -> AgentProcess:
    agent = AgentProcess(tmp_path / "agent", broker.url, device, **overrides)
    agent.start(env)
    wait_state(broker.url, "online", device)
    assert deploy(broker.url, tmp_path, "--model", "spin", "--version", "1", "--file", str(spin),
                  "--prefer", "onnxruntime", "--wait", "60", device=device) == 0
    return agent


# --- a real agent ---------------------------------------------------------------------------


def test_ready_only_after_stored_model_is_warmed_and_broker_session_is_up(
    tmp_path: Path, broker: Broker,
) -> None:
    device = "gw-sd-ready"
    mlp = build_mlp(tmp_path)
    agent = AgentProcess(tmp_path / "agent", broker.url, device)
    agent.start()
    try:
        wait_state(broker.url, "online", device)
        assert deploy(broker.url, tmp_path, "--model", "mlp", "--version", "1", "--file", str(mlp),
                      "--prefer", "onnxruntime", "--wait", "60", device=device) == 0
        assert agent.stop() == 0
        first_run = len(agent.log_text())

        notify = NotifySocket(snapshot=agent.log_text)
        try:
            agent.start(notify.env())
            _, ready, log_at_ready = notify.wait_for("READY", "1", timeout=60)
            second_run = log_at_ready[first_run:]
            # By the time READY=1 left the agent, it had restored (loaded and warmed up) the
            # stored model, and the broker had answered CONNECT and SUBSCRIBE.
            assert "restored 1 model(s)" in second_run
            assert "mlp:1 serving on onnxruntime/CPU" in second_run
            assert "connected to" in second_run
            assert second_run.index("restored 1 model(s)") < second_run.index("connected to")
            assert ready["STATUS"] == f"serving 1 model(s); broker {broker.url} connected"
            statuses = [f["STATUS"] for _, f, _ in notify.all() if "STATUS" in f]
            assert statuses[0].startswith("starting")
        finally:
            assert agent.stop() == 0
            notify.close()
    finally:
        agent.kill()


def test_ready_without_broker_after_connect_timeout(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens here
    agent = AgentProcess(tmp_path / "agent", url, "gw-sd-nobroker",
                         broker={"connect_timeout_s": 1.5})
    notify = NotifySocket(snapshot=agent.log_text)
    try:
        t0 = time.monotonic()
        agent.start(notify.env())
        at, ready, _ = notify.wait_for("READY", "1", timeout=60)
        assert at - t0 >= 1.5
        assert "locally" in ready["STATUS"] and "not reached" in ready["STATUS"]
        assert "broker.connect_timeout_s (1.5s)" in ready["STATUS"]
        assert agent.stop() == 0
        notify.wait_for("STOPPING", "1", timeout=5)
    finally:
        agent.kill()
        notify.close()


def test_watchdog_pings_while_healthy_and_stop_when_the_job_loop_stalls(
    tmp_path: Path, broker: Broker, spin_model: Path,
) -> None:
    device = "gw-sd-watchdog"
    notify = NotifySocket()
    agent = start_with_spin(
        tmp_path, broker, spin_model, device, notify.env(watchdog_usec=1_000_000),
        jobs={"workers": 1}, service={"job_stall_s": 3, "drain_timeout_s": 1},
    )
    try:
        notify.wait_for("READY", "1", timeout=30)
        with InferenceClient(broker.url) as client:
            # Healthy, with a job running well under the stall limit: pings every 0.5 s.
            steps = calibrate(client, device, 1.0)
            t0 = time.monotonic()
            result = client.infer("spin", spin_inputs(steps), device=device, timeout=60)
            assert result.outputs["y"].shape == (1, 64)
            time.sleep(max(0.0, t0 + 2.0 - time.monotonic()))
            t1 = time.monotonic()
            assert notify.pings(t0, t1) >= int((t1 - t0) / 0.5) - 1

            # A job that would run for hours: past service.job_stall_s the pings stop.
            client.submit("spin", spin_inputs(10**13), device=device, timeout=600)
            agent.wait_log("withholding WATCHDOG=1", timeout=30)
            stalled_at = time.monotonic()
            assert "job-worker-0 has run one job for longer than service.job_stall_s" \
                in agent.log_text()
            notify.wait_for("STATUS", timeout=5, since=stalled_at - 1.0)
            time.sleep(2.0)
            assert notify.pings(stalled_at + 0.1, time.monotonic()) == 0
            unhealthy = [f["STATUS"] for _, f, _ in notify.all()
                         if f.get("STATUS", "").startswith("unhealthy")]
            assert unhealthy and "stalled" in unhealthy[0]
    finally:
        agent.kill()
        notify.close()


def test_sigterm_says_stopping_answers_the_jobs_taken_and_exits_0(
    tmp_path: Path, broker: Broker, spin_model: Path,
) -> None:
    device = "gw-sd-drain"
    notify = NotifySocket()
    agent = start_with_spin(tmp_path, broker, spin_model, device, notify.env(),
                            jobs={"workers": 1}, service={"drain_timeout_s": 30})
    try:
        notify.wait_for("READY", "1", timeout=30)
        with InferenceClient(broker.url) as client:
            steps = calibrate(client, device, 1.5)
            done_at: dict[str, float] = {}

            def submit(job_id: str, n: int) -> Future[InferResult]:
                fut = client.submit("spin", spin_inputs(n), device=device, job_id=job_id,
                                    timeout=120)
                fut.add_done_callback(lambda _f: done_at.setdefault(job_id, time.monotonic()))
                return fut

            # One job running, two waiting (one worker), when SIGTERM comes.
            taken = [submit(f"taken-{i}", steps) for i in range(3)]
            time.sleep(0.8)  # all three taken (journaled, acknowledged), the first running
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            stopping_at, _, _ = notify.wait_for("STOPPING", "1", timeout=10)
            # A job that comes while the agent drains is not taken: the broker keeps it
            # for the next start.
            late = submit("late", 1000)
            results = [f.result(60) for f in taken]
            assert [r.id for r in results] == ["taken-0", "taken-1", "taken-2"]
            assert all(r.outputs["y"].shape == (1, 64) for r in results)
            assert done_at["taken-2"] > stopping_at  # answered during the drain, not before
            assert agent.proc.wait(60) == 0
            log = agent.log_text()
            assert "all jobs taken are answered" in log
            assert not late.done()

            agent.start()
            assert late.result(60).id == "late"
    finally:
        agent.kill()
        notify.close()


def test_sighup_applies_the_log_level_and_refuses_a_broken_config(
    tmp_path: Path, broker: Broker,
) -> None:
    device = "gw-sd-reload"
    agent = AgentProcess(tmp_path / "agent", broker.url, device, log={"level": "INFO"})
    notify = NotifySocket()
    try:
        agent.start(notify.env())
        notify.wait_for("READY", "1", timeout=30)
        assert agent.proc is not None

        def rewrite(change: Callable[[dict[str, Any]], None]) -> None:
            cfg = yaml.safe_load(agent.config.read_text())
            change(cfg)
            agent.config.write_text(yaml.safe_dump(cfg))

        def hup_and_wait(needle: str) -> float:
            before = time.monotonic()
            agent.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            agent.wait_log(needle, timeout=10)
            notify.wait_for("READY", "1", timeout=10, since=before)
            return before

        with InferenceClient(broker.url) as client:
            with pytest.raises(NotFound):
                client.infer("nope", spin_inputs(1), device=device, job_id="at-info")
            assert "job at-info: NOT_FOUND" not in agent.log_text()  # a DEBUG line

            def to_debug(cfg: dict[str, Any]) -> None:
                cfg["log"]["level"] = "DEBUG"
                cfg.setdefault("jobs", {})["workers"] = 3

            rewrite(to_debug)
            before = hup_and_wait("config reloaded:")
            assert notify.wait_for("RELOADING", "1", since=before)
            log = agent.log_text()
            assert "applied log.level (INFO -> DEBUG)" in log
            assert "needs a restart: jobs.workers" in log
            with pytest.raises(NotFound):
                client.infer("nope", spin_inputs(1), device=device, job_id="at-debug")
            agent.wait_log("job at-debug: NOT_FOUND", timeout=5)

            rewrite(lambda cfg: cfg["log"].update(level="LOUD"))
            hup_and_wait("config reload refused")
            assert "key 'log.level'" in agent.log_text()
            status = notify.all()[-1][1]["STATUS"]
            assert "config reload refused" in status and "log.level" in status
            # Still running, still answering, still at DEBUG.
            assert agent.proc.poll() is None
            with pytest.raises(NotFound):
                client.infer("nope", spin_inputs(1), device=device, job_id="after-refusal")
            agent.wait_log("job after-refusal: NOT_FOUND", timeout=5)
        assert agent.stop() == 0
    finally:
        agent.kill()
        notify.close()
