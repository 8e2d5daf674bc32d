"""A real edge-agent process for integration tests: own config, own state dir, own log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


class AgentProcess:
    def __init__(self, workdir: Path, broker_url: str, device_id: str = "gw-test",
                 **overrides: Any) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.device_id = device_id
        self.state_dir = workdir / "state"
        self.config = workdir / "agent.yaml"
        self.log = workdir / "agent.log"
        cfg: dict[str, Any] = {
            "device_id": device_id,
            "state_dir": str(self.state_dir),
            "broker": {"url": broker_url, "keepalive_s": 10, "reconnect_min_s": 0.1,
                       "reconnect_max_s": 1.0},
            "telemetry": {"interval_s": 1},
            "log": {"level": "DEBUG"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env_extra: dict[str, str] | None = None) -> None:
        logf = self.log.open("ab")
        env = dict(os.environ)
        env.pop("EDGE_AGENT_CONFIG", None)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)  # only a test that says so runs the agent "under systemd"
        env.update(env_extra or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeinfer.agent.cli", "run", "--config", str(self.config)],
            stdout=logf, stderr=subprocess.STDOUT, env=env,
        )
        logf.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in agent log after {timeout}s:\n{self.log_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode
