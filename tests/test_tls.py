"""Transport security with certificates: mqtts:// with a private CA, mutual TLS, server names,
CRLs and the deploy/ ACL, against a real mosquitto and real agent processes; make_certs.py.

Certificates are made with deploy/make_certs.py (tests/pki.py, the `pki` fixture); the broker
runs deploy/mosquitto-tls.conf and deploy/acl with only paths and the port rewritten.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from bench.models import DigitsModel
from edgeinfer.contract.topics import Topics
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.mqtt import BrokerError, Connection, connect, read_retained
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.pki import DEPLOY, PREFIX, Pki, deploy_conf, mc, start_broker, wait_state


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


def test_make_certs_refuses_to_overwrite_a_key(tmp_path: Path, pki: Pki) -> None:
    assert mc.main(["--dir", str(pki.dir), "client", "gw-a"]) == 1
    assert mc.main(["--dir", str(tmp_path), "client", "x"]) == 1  # no CA yet
