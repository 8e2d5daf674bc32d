"""A private CA for the TLS tests (deploy/make_certs.py) and the mosquitto brokers that use
it: deploy/mosquitto-tls.conf with only paths and the port rewritten, mqtts:// URLs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeinfer.contract.topics import Topics
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.mqtt import read_retained
from tests.broker import Broker

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PREFIX = "edge/v1"


def _load_make_certs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_certs", DEPLOY / "make_certs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _load_make_certs()


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
