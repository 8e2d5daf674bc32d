"""Probe, not a test: what an oversized job and a client's bad jobs do to a real agent.

    python -m bench.probes.oversize [--mb 200] [--limit-mb N]

Starts a mosquitto (no max_packet_size) and an `edge-agent` with its default jobs config,
deploys the tiny MLP (x FP32 [N, 64]; --prefer, default openvino then onnxruntime, so that
a failover has somewhere to go) and prints:

(a) a job of --mb megabytes (default 200): acknowledged by the agent (the PUBACK reached
    the sender)?, the most bytes the state dir held (journal and spool), the agent's RSS
    before, at its peak and after, the answer's code and the seconds until it came;
(b) a job at the limit (--limit-mb, default the agent's default limit): RSS peak;
(c) four empty-batch jobs (x of shape [0, 64]) and four of the wrong rank: their answer
    codes, the runtime failover events, and a good job's answer after them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.models import build_mlp
from edgeinfer.agent.config import JobsConfig
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.localbroker import Broker
from edgeinfer.fleet.mqtt import connect, new_client_id

PREFIX = "edge/v1"
DEVICE = "probe-oversize"
MB = 1024 * 1024


def default_limit() -> int:
    cfg = JobsConfig()
    return cfg.max_message_bytes


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


class Sampler:
    """The agent's RSS and the state dir's size, sampled every 20 ms; their peaks."""

    def __init__(self, pid: int, state: Path) -> None:
        self.pid, self.state = pid, state
        self.rss_peak = 0
        self.disk_peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, rss(self.pid))
            self.disk_peak = max(self.disk_peak, dir_bytes(self.state))
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


class Client:
    def __init__(self, url: str) -> None:
        self.topic = f"{PREFIX}/reply/{new_client_id('probe')}/res"
        self.answers: dict[bytes, tuple[dict[str, Any], float]] = {}
        self._cond = threading.Condition()
        self.conn = connect(url, timeout_s=30)
        self.conn.subscribe(self.topic, self._on)

    def _on(self, msg: Any) -> None:
        corr = bytes(getattr(msg.properties, "CorrelationData", b"") or b"")
        with self._cond:
            self.answers[corr] = (json.loads(msg.payload), time.monotonic())
            self._cond.notify_all()

    def send(self, topic: str, body: bytes, corr: bytes) -> Any:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.topic
        props.CorrelationData = corr
        return self.conn.publish(topic, body, qos=1, properties=props)

    def wait(self, corr: bytes, timeout: float) -> tuple[dict[str, Any], float] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while corr not in self.answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.answers[corr]


def code_of(answer: dict[str, Any] | None) -> str:
    if answer is None:
        return "no answer"
    params = answer.get("parameters") or {}
    if "code" in params:
        return f"{params['code']}: {params.get('message', answer.get('error', ''))}"[:200]
    return "OK"


def big_job(size: int, job_id: str) -> bytes:
    """A JSON job padded with spaces to `size` bytes (the agent refuses it on size alone)."""
    head = json.dumps({"id": job_id, "model_name": "mlp", "inputs": []}).encode()
    return head + b" " * max(0, size - len(head))


def sized(label: str, client: Client, topics: Topics, agent: subprocess.Popen[bytes],
          state: Path, size: int, corr: bytes) -> None:
    time.sleep(1.0)
    before = rss(agent.pid)
    sampler = Sampler(agent.pid, state)
    body = big_job(size, corr.decode())
    started = time.monotonic()
    fut = client.send(topics.jobs, body, corr)
    del body
    acked: object
    try:
        fut.result(timeout=300)
        acked = f"yes, after {time.monotonic() - started:.2f} s"
    except Exception as exc:
        acked = f"no ({type(exc).__name__}: {exc})"
    got = client.wait(corr, 300)
    took = f"{got[1] - started:.2f} s" if got else "-"
    time.sleep(2.0)
    sampler.stop()
    after = rss(agent.pid)
    print(f"{label}: job of {size} bytes ({size / MB:.1f} MiB)")
    print(f"  acknowledged (PUBACK to the sender): {acked}")
    print(f"  state dir: peak {sampler.disk_peak / MB:.1f} MiB, now {dir_bytes(state) / MB:.1f} MiB")
    print(f"  agent RSS: before {before / MB:.0f} MiB, peak {sampler.rss_peak / MB:.0f} MiB "
          f"(+{(sampler.rss_peak - before) / MB:.0f}), after {after / MB:.0f} MiB")
    print(f"  answer: {code_of(got[0] if got else None)}; {took} from send to answer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.probes.oversize")
    ap.add_argument("--mb", type=float, default=200.0, help="size of the big job (MB, 10^6)")
    ap.add_argument("--limit-mb", type=float, default=None,
                    help="size of the job at the limit (MiB; default the agent's default limit)")
    ap.add_argument("--prefer", default="openvino,onnxruntime",
                    help="the deploy's runtime preference ('auto': the tuner's choice)")
    ap.add_argument("--bad", type=int, default=4, help="empty-batch jobs (and wrong-rank ones)")
    args = ap.parse_args(argv)
    limit = int(args.limit_mb * MB) if args.limit_mb else default_limit()
    with tempfile.TemporaryDirectory(prefix="probe-oversize-") as tmp:
        root = Path(tmp)
        broker = Broker(root / "broker")
        broker.start()
        state = root / "state"
        cfg = {"device_id": DEVICE, "state_dir": str(state), "broker": {"url": broker.url},
               "log": {"level": "INFO"}}
        (root / "agent.yaml").write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        log = (root / "agent.log").open("wb")
        agent = subprocess.Popen([sys.executable, "-m", "edgeinfer.agent.cli", "run", "--config",
                                  str(root / "agent.yaml")], stdout=log, stderr=log, env=env)
        topics = Topics(PREFIX, DEVICE)
        client = None
        events: list[dict[str, Any]] = []
        try:
            model = build_mlp(root / "models")
            rc = fleet(["deploy", "--broker", broker.url, "--device", DEVICE, "--artifact-dir",
                        str(root / "artifacts"), "--model", "mlp", "--version", "1",
                        "--file", str(model), "--prefer", args.prefer, "--wait", "120"])
            if rc:
                print(f"deploy failed ({rc})\n{(root / 'agent.log').read_text()[-3000:]}")
                return 1
            client = Client(broker.url)
            client.conn.subscribe(topics.events, lambda m: events.append(json.loads(m.payload)))
            print(f"agent limit (default config): {limit} bytes ({limit / MB:.1f} MiB)")
            sized("(a) big job", client, topics, agent, state, int(args.mb * 1e6), b"big")
            sized("(b) job at the limit", client, topics, agent, state, limit, b"at-limit")
            print(f"(c) {args.bad} empty-batch jobs, {args.bad} wrong-rank jobs, then a good one")
            bodies = []
            for i in range(args.bad):
                bodies.append(("empty", json.dumps({"id": f"e{i}", "model_name": "mlp", "inputs": [
                    {"name": "x", "shape": [0, 64], "datatype": "FP32", "data": []}]}).encode()))
            for i in range(args.bad):
                bodies.append(("rank", json.dumps({"id": f"r{i}", "model_name": "mlp", "inputs": [
                    {"name": "x", "shape": [64], "datatype": "FP32",
                     "data": [0.0] * 64}]}).encode()))
            x = np.ones((1, 64), np.float32).ravel().tolist()
            bodies.append(("good", json.dumps({"id": "g", "model_name": "mlp", "inputs": [
                {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x}]}).encode()))
            for i, (kind, body) in enumerate(bodies):
                corr = f"{kind}{i}".encode()
                client.send(topics.jobs, body, corr)
                got = client.wait(corr, 30)
                answer = got[0] if got else None
                extra = ""
                if kind == "good" and answer is not None:
                    extra = f" (runtime {(answer.get('parameters') or {}).get('runtime')})"
                print(f"  {kind:5s} job: {code_of(answer)}{extra}")
            time.sleep(3.0)  # a failover runs on its own thread
            fo = [e for e in events if str(e.get("type", "")).startswith("runtime_failover")]
            print(f"  failover events: {len(fo)} "
                  + "; ".join(f"{e['type']}: {str(e.get('reason', ''))[:160]}" for e in fo))
        finally:
            if client is not None:
                client.conn.close()
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
            log.close()
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
