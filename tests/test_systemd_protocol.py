"""systemd without a process: the notify protocol (a path and an abstract socket), the
watchdog interval from $WATCHDOG_USEC, the health rule and the pings it withholds, the reload
diff; and systemd/edge-agent.service, read and checked by systemd-analyze verify.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from edgeinfer.agent.config import ServiceConfig
from edgeinfer.agent.lifecycle import changed_keys, flatten, health_problem
from edgeinfer.agent.systemd import Notifier, Watchdog, watchdog_interval
from edgeinfer.contract.credentials import DEFAULT_CREDENTIAL

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edge-agent.service"


# --- the protocol and the rules, without a process -----------------------------------------


def test_notifier_sends_to_a_path_and_to_an_abstract_socket(tmp_path: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    try:
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        plain.bind(str(short / "n"))
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"edgeinfer-test-{os.getpid()}-{time.monotonic_ns()}"
        abstract.bind("\0" + name)
        for sock, address in ((plain, str(short / "n")), (abstract, "@" + name)):
            sock.settimeout(2)
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
            assert notifier.enabled
            assert notifier.notify("READY=1", "STATUS=serving")
            assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
            assert notifier.status("two\nlines")
            assert sock.recv(4096) == b"STATUS=two lines"
            notifier.close()
            sock.close()
    finally:
        shutil.rmtree(short)
    # Outside systemd: nothing to send to, and no error.
    assert not Notifier.from_environ({}).notify("READY=1")
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    # A manager that went away is logged, never raised.
    assert not Notifier(str(tmp_path / "gone")).notify("WATCHDOG=1")


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "42"}, pid=42) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "43"}, pid=42) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


class FakeJobs:
    def __init__(self) -> None:
        self.running: tuple[str, float] | None = None
        self.dead: list[str] = []

    def longest_job(self) -> tuple[str, float] | None:
        return self.running

    def dead_threads(self) -> list[str]:
        return self.dead


class FakeNetwork:
    def __init__(self) -> None:
        self.age = 0.1

    def loop_age(self) -> float:
        return self.age


def test_health_rule_names_a_stalled_job_a_dead_thread_and_a_stuck_network_loop() -> None:
    jobs, net = FakeJobs(), FakeNetwork()
    limits = ServiceConfig(job_stall_s=10, network_stall_s=60)
    assert health_problem(jobs, net, limits) is None
    jobs.running = ("job-worker-0", 9.0)  # long, but under the limit: healthy
    assert health_problem(jobs, net, limits) is None
    jobs.running = ("job-worker-0", 11.0)
    assert "job-worker-0" in (health_problem(jobs, net, limits) or "")
    assert "service.job_stall_s" in (health_problem(jobs, net, limits) or "")
    jobs.running = None
    net.age = 61.0
    assert "service.network_stall_s" in (health_problem(jobs, net, limits) or "")
    net.age = float("inf")
    assert "died" in (health_problem(jobs, net, limits) or "")
    net.age = 0.1
    jobs.dead = ["job-worker-1"]
    assert "job-worker-1" in (health_problem(jobs, net, limits) or "")


def test_watchdog_withholds_pings_while_unhealthy_and_resumes() -> None:
    sent: list[tuple[str, ...]] = []

    class Recorder(Notifier):
        def notify(self, *assignments: str) -> bool:
            sent.append(assignments)
            return True

    problem: list[str | None] = [None]
    dog = Watchdog(Recorder(None), 60.0, lambda: problem[0], lambda: "serving")
    dog.beat()
    problem[0] = "job-worker-0 is stuck"
    dog.beat()
    dog.beat()
    problem[0] = None
    dog.beat()
    assert sent == [("WATCHDOG=1",), ("STATUS=unhealthy: job-worker-0 is stuck",),
                    ("STATUS=serving",), ("WATCHDOG=1",)]
    assert dog.pings == 2


def test_reload_diff_names_changed_keys() -> None:
    from edgeinfer.agent.config import load_config

    old = flatten(load_config(None, {}))
    new = flatten(load_config(None, {"EDGE_AGENT_LOG__LEVEL": "DEBUG",
                                     "EDGE_AGENT_JOBS__WORKERS": "3"}))
    assert changed_keys(old, new) == ["jobs.workers", "log.level"]

# --- the unit file ---------------------------------------------------------------------------


def unit_section(name: str) -> dict[str, str]:
    """Key -> value of one section of the unit (the last value of a repeated key)."""
    section: dict[str, str] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == name:
            key, _, value = line.partition("=")
            section[key] = value
    return section


def test_unit_file_asks_for_what_the_agent_does() -> None:
    service = unit_section("Service")
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert int(service["WatchdogSec"]) > 0
    # systemd's SIGKILL must not cut a drain short.
    assert int(service["TimeoutStopSec"]) > ServiceConfig().drain_timeout_s + 30
    assert "MemoryDenyWriteExecute" not in service  # OpenVINO and oneDNN JIT-compile
    assert "PrivateDevices" not in service  # GPUs and NPUs live in /dev
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["StateDirectory"] == "edge-agent"
    assert service["CapabilityBoundingSet"] == ""
    assert service["LoadCredential"] == DEFAULT_CREDENTIAL  # what edgeinfer/contract/credentials.py reads


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart= exists: point it at a binary this machine has.
    text = UNIT.read_text().replace("/opt/edgeinfer/.venv/bin/edge-agent", "/bin/true")
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, out
    # Unknown keys and bad values are only warnings: any line about our file fails the test.
    assert str(unit) not in out and "edge-agent.service" not in out, out
