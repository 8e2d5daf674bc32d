"""User names and passwords for the broker: the agent reads its password from
$CREDENTIALS_DIRECTORY and never logs it; a wrong one is refused, by the agent, its doctor and
the fleet CLI. A real mosquitto (TLS on the server side, password_file, the deploy/ ACL) and
real agent processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from edgeinfer.contract.credentials import resolve_password
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.cli import main as fleet
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.pki import DEPLOY, Pki, start_broker, wait_state

MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")


@pytest.fixture
def password_broker(pki: Pki, tmp_path: Path) -> Iterator[tuple[Broker, str]]:
    """TLS (server side) + password_file + the deploy ACL; users gw-p and fleet."""
    if not MOSQUITTO_PASSWD.exists():
        pytest.skip(f"{MOSQUITTO_PASSWD} is not installed: cannot make a mosquitto password file")
    work = tmp_path / "broker"
    work.mkdir()
    password = "pw-" + uuid.uuid4().hex
    passwd = work / "passwd"
    for user, pw in (("gw-p", password), ("fleet", "fleet-" + password)):
        flag = ["-c"] if not passwd.exists() else []
        subprocess.run([str(MOSQUITTO_PASSWD), *flag, "-b", str(passwd), user, pw], check=True,
                       capture_output=True)
    shutil.copy(DEPLOY / "acl", work / "acl")
    conf = "\n".join([
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {work}/acl",
        f"password_file {passwd}",
        "set_tcp_nodelay true",  # as deploy/ has it; doctor fails a broker with Nagle on
        "listener {port} 127.0.0.1",
        f"certfile {pki.dir}/broker.pem",
        f"keyfile {pki.dir}/broker.key",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "",
    ])
    b = start_broker(work, conf)
    try:
        yield b, password
    finally:
        b.stop()


def _credentials(tmp_path: Path, password: str) -> Path:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(password + "\n")
    (creds / "mqtt-password").chmod(0o400)
    return creds


def test_agent_password_from_credentials_directory_never_logged(
    password_broker: tuple[Broker, str], pki: Pki, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    broker, password = password_broker
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(_credentials(tmp_path, password)))
    agent = AgentProcess(tmp_path / "agent", broker.url, "gw-p",
                         broker={"tls": {"ca_file": pki.path("ca.pem")}, "username": "gw-p"})
    agent.start()
    try:
        (tmp_path / "fleetpw").write_text(f"fleet-{password}\n")
        (tmp_path / "fleetpw").chmod(0o600)
        fleet_sec = TransportSecurity(ca_file=pki.path("ca.pem"), username="fleet",
                                      password=resolve_password(str(tmp_path / "fleetpw")))
        wait_state(broker.url, fleet_sec, "gw-p")
        agent.wait_log("connected to")
        # The fleet CLI with --username and --password-file.
        capsys.readouterr()
        assert fleet(["devices", "--broker", broker.url, "--ca-file", pki.path("ca.pem"),
                      "--username", "fleet", "--password-file", str(tmp_path / "fleetpw"),
                      "--json"]) == 0
        assert [d["device"] for d in json.loads(capsys.readouterr().out)] == ["gw-p"]
        doctor = subprocess.run(
            [sys.executable, "-m", "edgeinfer.agent.cli", "doctor", "--config", str(agent.config)],
            capture_output=True, text=True, timeout=120, check=False,
        )
    finally:
        agent.stop()
    log = agent.log_text()
    assert yaml.safe_load(agent.config.read_text())["log"]["level"] == "DEBUG"
    assert "password from $CREDENTIALS_DIRECTORY/mqtt-password" in log
    assert password not in log
    out = doctor.stdout + doctor.stderr
    assert doctor.returncode == 0, out
    assert "answers" in out and "user gw-p with password from" in out
    # deploy/acl lets the device time jobs on its own doctor/ topics, over TLS.
    assert "job round trip p50" in out and "not measured" not in out, out
    assert password not in out


def test_wrong_password_is_refused_and_not_logged(
    password_broker: tuple[Broker, str], pki: Pki, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, password = password_broker
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(_credentials(tmp_path, wrong)))
    agent = AgentProcess(tmp_path / "agent", broker.url, "gw-p",
                         broker={"tls": {"ca_file": pki.path("ca.pem")}, "username": "gw-p"})
    agent.start()
    try:
        agent.wait_log("refused the connection", timeout=30)
        doctor = subprocess.run(
            [sys.executable, "-m", "edgeinfer.agent.cli", "doctor", "--config", str(agent.config)],
            capture_output=True, text=True, timeout=120, check=False,
        )
    finally:
        agent.stop()
    log = agent.log_text()
    assert "Bad user name or password" in log or "Not authorized" in log
    assert "connected to" not in log
    assert wrong not in log and password not in log
    out = doctor.stdout + doctor.stderr
    assert doctor.returncode == 1 and "refused the connection" in out, out
    assert wrong not in out
    # The fleet side: --username with --password-file, refused the same way.
    (tmp_path / "pw").write_text(wrong)
    assert fleet(["devices", "--broker", broker.url, "--ca-file", pki.path("ca.pem"),
                  "--username", "gw-p", "--password-file", str(tmp_path / "pw")]) == 2

