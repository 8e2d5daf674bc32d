"""Transport security: mqtts:// with a private CA, mutual TLS, the deploy/ ACL, CRLs and
passwords from $CREDENTIALS_DIRECTORY, against a real mosquitto and real agent processes.

Certificates are made here with deploy/make_certs.py; the broker runs deploy/mosquitto-tls.conf
and deploy/acl with only paths and the port rewritten.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.reasoncodes import ReasonCode

from bench.models import DigitsModel
from edgeinfer.agent.config import ConfigError, load_config
from edgeinfer.agent.tls import security_from_config
from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.credentials import Secret, resolve_password
from edgeinfer.contract.topics import Topics
from edgeinfer.contract.transport import TransportError, TransportSecurity
from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.mqtt import BrokerError, Connection, connect, read_retained
from tests.agentproc import AgentProcess
from tests.broker import Broker

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PREFIX = "edge/v1"
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")


def _load_make_certs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_certs", DEPLOY / "make_certs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _load_make_certs()


# -- certificates and brokers ----------------------------------------------------------


class Pki:
    """A fleet CA with a broker certificate and client certificates, and a stranger CA."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        assert mc.main(["--dir", str(d), "ca"]) == 0
        assert mc.main(["--dir", str(d), "broker", "--name", "localhost", "--name",
                        "broker.test", "--ip", "127.0.0.1"]) == 0
        assert mc.main(["--dir", str(d), "client", "fleet", "gw-a", "gw-b", "app-1",
                        "gw-revoked"]) == 0
        assert mc.main(["--dir", str(d), "revoke", "gw-revoked"]) == 0
        # A broker certificate for the same names from a CA the fleet does not trust.
        other = d / "other"
        other.mkdir()
        key, cert = mc.make_ca("some other CA")
        mc.write_pair(other, "ca", key, cert)
        bkey, bcert = mc.issue(key, cert, "localhost", server_names=["localhost"],
                               server_ips=["127.0.0.1"])
        mc.write_pair(other, "broker", bkey, bcert)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def security(self, cn: str, **kw: Any) -> TransportSecurity:
        return TransportSecurity(ca_file=self.path("ca.pem"), cert_file=self.path(f"{cn}.pem"),
                                 key_file=self.path(f"{cn}.key"), **kw)

    def agent_tls(self, cn: str) -> dict[str, str]:
        return {"ca_file": self.path("ca.pem"), "cert_file": self.path(f"{cn}.pem"),
                "key_file": self.path(f"{cn}.key")}


def deploy_conf(workdir: Path, files: dict[str, Path]) -> str:
    """deploy/mosquitto-tls.conf with our files, a log fit for a test, and a `{port}`."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, workdir / name)
    text = (DEPLOY / "mosquitto-tls.conf").read_text()
    assert "listener 8883\n" in text
    text = text.replace("listener 8883\n", "listener {port} 127.0.0.1\n")
    text = text.replace("/etc/mosquitto/edgeinfer/", f"{workdir}/")
    text = text.replace("/var/lib/mosquitto/", f"{workdir}/")
    return text + "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"


def start_broker(workdir: Path, conf: str) -> Broker:
    """A mosquitto from `conf` (whose listener is on the Broker's free port), mqtts:// URL."""
    b = Broker(workdir)
    conf = conf.replace("{port}", str(b.port))
    if os.geteuid() == 0:
        # mosquitto started as root drops to user `mosquitto`, who cannot read our
        # private tmp dir (the ACL and password files are read after the drop).
        conf = "user root\n" + conf
    b.conf.write_text(conf)
    b.url = f"mqtts://127.0.0.1:{b.port}"
    b.start()
    return b


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    work = tmp_path_factory.mktemp("tls-broker")
    files = {n: pki.dir / n for n in ("ca.pem", "broker.pem", "broker.key", "crl.pem")}
    files["acl"] = DEPLOY / "acl"
    b = start_broker(work, deploy_conf(work, files))
    try:
        yield b
    finally:
        b.stop()


def wait_state(url: str, security: TransportSecurity, device: str, want: str = "online",
               timeout: float = 30.0) -> dict[str, Any]:
    topic = Topics(PREFIX, device).state
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        got = read_retained(url, [topic], quiet_s=0.1, timeout_s=1, security=security)
        if topic in got:
            last = json.loads(got[topic])
            if last.get("state") == want:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{device} never became {want!r}; last: {last}")


def tls_args(pki: Pki, cn: str) -> list[str]:
    return ["--ca-file", pki.path("ca.pem"), "--cert-file", pki.path(f"{cn}.pem"),
            "--key-file", pki.path(f"{cn}.key")]


class Probe:
    """A raw MQTT v5 client to see exactly what the broker grants: SUBACK and PUBACK codes."""

    def __init__(self, url: str, security: TransportSecurity, client_id: str) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.acks: dict[int, list[ReasonCode]] = {}
        self._cond = threading.Condition()
        self.conn = Connection(url, client_id, security=security)
        self.conn.client.on_message = self._on_message
        self.conn.open(5.0)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def subscribe(self, topic: str) -> list[ReasonCode]:
        got: dict[str, list[ReasonCode]] = {}
        done = threading.Event()

        def on_subscribe(_c: Any, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
            got["codes"] = codes
            done.set()

        self.conn.client.on_subscribe = on_subscribe
        self.conn.client.subscribe(topic, qos=1)
        assert done.wait(5), f"no SUBACK for {topic}"
        return got["codes"]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode | None:
        """QoS 1; the PUBACK's reason code (None when paho reports none)."""
        got: dict[str, Any] = {}
        done = threading.Event()

        def on_publish(_c: Any, _u: Any, _mid: int, rc: ReasonCode, _p: Any) -> None:
            got["rc"] = rc
            done.set()

        self.conn.client.on_publish = on_publish
        info = self.conn.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == paho.MQTT_ERR_SUCCESS
        assert done.wait(5), f"no PUBACK for {topic}"
        rc: ReasonCode | None = got.get("rc")
        return rc

    def received(self, topic: str, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while time.monotonic() < deadline:
                self._cond.wait(max(deadline - time.monotonic(), 0.01))
            return [bytes(m.payload) for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.conn.close()


# -- mutual TLS end to end -------------------------------------------------------------


def test_agent_serves_jobs_over_mutual_tls(
    tls_broker: Broker, pki: Pki, digits: DigitsModel, tmp_path: Path,
) -> None:
    agent = AgentProcess(tmp_path / "agent", tls_broker.url, "gw-a",
                         broker={"tls": pki.agent_tls("gw-a")}, jobs={"pools": ["line-1"]})
    agent.start()
    try:
        fleet_sec = pki.security("fleet")
        wait_state(tls_broker.url, fleet_sec, "gw-a")
        assert "TLS, broker certificate checked against" in agent.log_text()
        # The fleet CLI over mqtts:// with the fleet identity: the only one that writes desired.
        assert fleet(["deploy", "--broker", tls_broker.url, *tls_args(pki, "fleet"),
                      "--device", "gw-a", "--artifact-dir", str(tmp_path / "artifacts"),
                      "--model", "digits", "--version", "1", "--file", str(digits.path),
                      "--wait", "60"]) == 0
        # A job client with its own certificate: answers come back under its client id.
        with InferenceClient(tls_broker.url, security=pki.security("app-1")) as client:
            for i in range(3):
                res = client.infer("digits", {"x": digits.x_test[i : i + 1]}, device="gw-a",
                                   timeout=30)
                assert int(np.asarray(res.outputs["label"]).ravel()[0]) == digits.sklearn_pred[i]
            # Pool jobs through the shared subscription the ACL allows.
            res = client.infer("digits", {"x": digits.x_test[:1]}, pool="line-1", timeout=30)
            assert int(np.asarray(res.outputs["label"]).ravel()[0]) == digits.sklearn_pred[0]
    finally:
        agent.stop()


def test_fleet_cli_reads_devices_over_tls_and_refuses_tls_options_on_plain_url(
    tls_broker: Broker, pki: Pki, capsys: pytest.CaptureFixture[str],
) -> None:
    assert fleet(["devices", "--broker", tls_broker.url, *tls_args(pki, "fleet"), "--json"]) == 0
    capsys.readouterr()
    plain = tls_broker.url.replace("mqtts://", "mqtt://")
    assert fleet(["devices", "--broker", plain, *tls_args(pki, "fleet")]) == 2
    assert "use mqtts://" in capsys.readouterr().err


def test_server_name_is_verified(tls_broker: Broker, pki: Pki) -> None:
    # The broker's certificate names broker.test; dialling by IP while expecting that works.
    with connect(tls_broker.url, security=pki.security("fleet", server_name="broker.test")):
        pass
    with pytest.raises(BrokerError, match=r"not trusted.*[Hh]ostname mismatch"):
        connect(tls_broker.url, security=pki.security("fleet", server_name="elsewhere.test"))


def test_agent_refuses_broker_certificate_from_unknown_ca(pki: Pki, tmp_path: Path) -> None:
    work = tmp_path / "broker"
    files = {"ca.pem": pki.dir / "ca.pem", "broker.pem": pki.dir / "other" / "broker.pem",
             "broker.key": pki.dir / "other" / "broker.key", "crl.pem": pki.dir / "crl.pem",
             "acl": DEPLOY / "acl"}
    broker = start_broker(work, deploy_conf(work, files))
    agent = AgentProcess(tmp_path / "agent", broker.url, "gw-a",
                         broker={"tls": pki.agent_tls("gw-a")})
    agent.start()
    try:
        agent.wait_log("certificate is not trusted", timeout=30)
        log = agent.log_text()
        assert "certificate verify failed" in log or "unable to get local issuer" in log
        assert "connected to" not in log
        # The fleet tools refuse it just the same.
        with pytest.raises(BrokerError, match="not trusted"):
            connect(broker.url, security=pki.security("fleet"))
    finally:
        agent.stop()
        broker.stop()


def test_broker_refuses_revoked_client_certificate(tls_broker: Broker, pki: Pki) -> None:
    with pytest.raises(BrokerError, match="rejected the client certificate"):
        connect(tls_broker.url, security=pki.security("gw-revoked"), timeout_s=5)
    assert "certificate verify failed" in Path(tls_broker.log).read_text()
    # No client certificate at all: refused too (require_certificate).
    with pytest.raises(BrokerError):
        connect(tls_broker.url, security=TransportSecurity(ca_file=pki.path("ca.pem")),
                timeout_s=5)
    with connect(tls_broker.url, security=pki.security("gw-b")):
        pass


# -- the ACL ---------------------------------------------------------------------------


def test_acl_device_cannot_read_another_devices_jobs(tls_broker: Broker, pki: Pki) -> None:
    b_jobs = Topics(PREFIX, "gw-b").jobs
    spy = Probe(tls_broker.url, pki.security("gw-a"), "probe-a-" + uuid.uuid4().hex[:6])
    owner = Probe(tls_broker.url, pki.security("gw-b"), "probe-b-" + uuid.uuid4().hex[:6])
    app = Probe(tls_broker.url, pki.security("app-1"), "probe-app-" + uuid.uuid4().hex[:6])
    try:
        # mosquitto 2.0 grants such a SUBSCRIBE (2.0.11 answers "Granted QoS 1") and then
        # checks the read ACL on every message it would deliver: the spy must get nothing.
        spy.subscribe(b_jobs)
        spy.subscribe(f"{PREFIX}/dev/+/jobs")
        spy.subscribe(f"{PREFIX}/#")
        assert owner.subscribe(b_jobs)[0].value == 1
        rc = app.publish(b_jobs, b'{"id": "secret-job"}')
        assert rc is None or not rc.is_failure
        assert owner.received(b_jobs, 1.0) == [b'{"id": "secret-job"}']
        assert spy.received(b_jobs, 0.5) == []
    finally:
        for p in (spy, owner, app):
            p.close()


def test_acl_only_fleet_writes_desired(tls_broker: Broker, pki: Pki) -> None:
    b_desired = Topics(PREFIX, "gw-b").desired
    a_desired = Topics(PREFIX, "gw-a").desired
    fleet_sec = pki.security("fleet")
    fleet_probe = Probe(tls_broker.url, fleet_sec, "probe-fleet-" + uuid.uuid4().hex[:6])
    spy = Probe(tls_broker.url, pki.security("gw-a"), "probe-a-" + uuid.uuid4().hex[:6])
    try:
        # The fleet identity can write desired.
        rc = fleet_probe.publish(b_desired, b'{"revision": 7}', retain=True)
        assert rc is None or not rc.is_failure
        # Device A writing B's desired, or even its own: refused, with MQTT v5's reason code.
        for topic in (b_desired, a_desired):
            rc = spy.publish(topic, b'{"revision": 999}', retain=True)
            assert rc is not None and rc.is_failure and rc.getName() == "Not authorized", rc
        got = read_retained(tls_broker.url, [b_desired], quiet_s=0.2, timeout_s=2, security=fleet_sec)
        assert got == {b_desired: b'{"revision": 7}'}
        # B itself reads its desired state (retained).
        owner = Probe(tls_broker.url, pki.security("gw-b"), "probe-b-" + uuid.uuid4().hex[:6])
        try:
            assert not owner.subscribe(b_desired)[0].is_failure
            assert owner.received(b_desired, 0.5) == [b'{"revision": 7}']
        finally:
            owner.close()
    finally:
        fleet_probe.publish(b_desired, b"", retain=True)
        fleet_probe.close()
        spy.close()


# -- username and password from $CREDENTIALS_DIRECTORY ---------------------------------


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


# -- config: secrets never inline, TLS never ignored -----------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_inline_password_is_refused_without_echo(tmp_path: Path) -> None:
    p = _write(tmp_path, "broker:\n  username: gw-1\n  password: hunter2-inline\n")
    with pytest.raises(ConfigError, match=r"broker\.password") as info:
        load_config(p, {})
    assert "hunter2-inline" not in str(info.value)
    assert "password_file" in str(info.value)
    with pytest.raises(ConfigError, match=r"broker\.password") as info:
        load_config(None, {"EDGE_AGENT_BROKER__PASSWORD": "hunter2-env"})
    assert "hunter2-env" not in str(info.value)


def test_password_in_url_is_refused_without_echo(tmp_path: Path) -> None:
    p = _write(tmp_path, "broker:\n  url: mqtts://gw:hunter2-url@broker.example:8883\n")
    with pytest.raises(ConfigError, match=r"broker\.url") as info:
        load_config(p, {})
    assert "hunter2-url" not in str(info.value)
    with pytest.raises(ValueError, match="user name or password"):
        parse_broker_url("mqtt://u:p@host")


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ("broker:\n  url: mqtt://h:1883\n  tls:\n    ca_file: {ca}\n", "broker.tls", "use mqtts://"),
        ("broker:\n  url: mqtts://h\n  tls:\n    ca_file: /nonexistent/ca.pem\n",
         "broker.tls.ca_file", "no such file"),
        ("broker:\n  url: mqtts://h\n  tls:\n    key_file: {ca}\n", "broker.tls.key_file",
         "needs broker.tls.cert_file"),
        ("broker:\n  password_file: {ca}\n", "broker.password_file", "needs broker.username"),
        ("broker:\n  username: u\n  password_credential: ../x\n", "broker.password_credential",
         "plain file name"),
        ("broker:\n  tls:\n    verify: false\n", "broker.tls.verify", "unknown key"),
    ],
)
def test_transport_config_errors_name_the_key(
    tmp_path: Path, pki: Pki, text: str, key: str, what: str
) -> None:
    p = _write(tmp_path, text.replace("{ca}", pki.path("ca.pem")))
    with pytest.raises(ConfigError) as info:
        load_config(p, {})
    assert f"'{key}'" in str(info.value) and what in str(info.value), str(info.value)


def test_password_sources(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-credential\n")
    (creds / "other").write_text("other-credential")
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\r\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    cfg = load_config(_write(tmp_path, "broker:\n  username: u\n"), env)
    sec = security_from_config(cfg.broker, env)
    assert sec.password is not None and sec.password.reveal() == "from-credential"
    cfg = load_config(_write(tmp_path, "broker:\n  username: u\n  password_credential: other\n"),
                      env)
    assert security_from_config(cfg.broker, env).password.reveal() == "other-credential"  # type: ignore[union-attr]
    cfg = load_config(_write(tmp_path, f"broker:\n  username: u\n  password_file: {pw_file}\n"),
                      env)
    sec = security_from_config(cfg.broker, env)
    assert sec.password is not None and sec.password.reveal() == "from-file"
    # Nothing of the secret in repr/str/describe.
    addr = parse_broker_url("mqtts://broker.example")
    for text in (repr(sec), str(sec.password), sec.describe(addr), repr(cfg)):
        assert "from-file" not in text
    assert security_from_config(load_config(None, {}).broker, env).password is None
    # No username: the credential is not even read.
    assert isinstance(resolve_password(None, environ=env), Secret)
    pw_file.write_text("")
    cfg = load_config(_write(tmp_path, f"broker:\n  username: u\n  password_file: {pw_file}\n"), {})
    with pytest.raises(TransportError, match="empty"):
        security_from_config(cfg.broker, {})


def test_plain_password_to_remote_broker_warns() -> None:
    sec = TransportSecurity(username="u", password=Secret("x", "test"))
    assert any("clear text" in w for w in sec.warnings(parse_broker_url("mqtt://10.1.2.3")))
    assert not sec.warnings(parse_broker_url("mqtt://127.0.0.1"))
    assert not sec.warnings(parse_broker_url("mqtts://10.1.2.3"))


def test_make_certs_refuses_to_overwrite_a_key(tmp_path: Path, pki: Pki) -> None:
    assert mc.main(["--dir", str(pki.dir), "client", "gw-a"]) == 1
    assert mc.main(["--dir", str(tmp_path), "client", "x"]) == 1  # no CA yet
