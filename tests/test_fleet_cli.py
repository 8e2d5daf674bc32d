"""`edge-fleet devices`, `infer`, `serve` and the CLI's surface."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeinfer.fleet.cli import main
from edgeinfer.fleet.devices import rows_from_retained
from edgeinfer.fleet.mqtt import connect
from tests.broker import Broker, free_port, wait_port
from tests.test_fleet_client import Responder

REPO = Path(__file__).resolve().parent.parent


# -- devices ------------------------------------------------------------------------


def _retain(broker: Broker, messages: dict[str, object]) -> None:
    with connect(broker.url) as conn:
        for topic, doc in messages.items():
            payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            conn.publish(topic, payload, retain=True).result(2)


FLEET = {
    "edge/v1/dev/gw-1/state": {"state": "online", "agent_version": "0.1.0",
                               "session_id": "s1", "started_at": "2026-01-01T00:00:00Z"},
    "edge/v1/dev/gw-1/reported": {
        "device_id": "gw-1", "agent_version": "0.1.0", "revision": 3,
        "models": [
            {"name": "digits", "version": "3", "sha256": "ab", "state": "serving",
             "runtime": "onnxruntime", "device": "cpu", "error": None, "attempts": []},
            {"name": "yolo", "version": "8", "sha256": "cd", "state": "failed",
             "runtime": None, "device": None, "error": "bad model", "attempts": []},
        ],
        "last_error": "yolo:8 failed to load:\n  bad model", "hardware": {},
        "updated_at": "2026-01-01T00:00:01Z",
    },
    "edge/v1/dev/gw-1/desired": {"revision": 4, "models": []},
    "edge/v1/dev/cam-2/state": b"offline",
    "edge/v1/dev/cam-2/desired": {"revision": 1, "models": []},
    "other/v1/dev/zz/state": {"state": "online"},
}


def test_devices_table(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    _retain(broker, FLEET)
    assert main(["devices", "--broker", broker.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEVICE", "STATE", "REVISION", "MODELS", "LAST", "ERROR"]
    assert lines[1].split() == ["cam-2", "offline", "-", "(desired", "1)", "-", "-"]
    assert lines[2].split()[:4] == ["gw-1", "online", "3", "(desired"]
    assert ("digits:3@onnxruntime/cpu[serving], yolo:8[failed]  "
            "yolo:8 failed to load: bad model") in lines[2]
    assert len(lines) == 3  # zz lives under another prefix


def test_devices_json_and_prefix(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    _retain(broker, FLEET)
    assert main(["devices", "--broker", broker.url, "--json"]) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gw-1"]["revision"] == 3
    assert rows["gw-1"]["desired_revision"] == 4
    assert rows["gw-1"]["agent_version"] == "0.1.0"
    assert [m["name"] for m in rows["gw-1"]["models"]] == ["digits", "yolo"]
    assert rows["cam-2"]["state"] == "offline"
    assert main(["devices", "--broker", broker.url, "--prefix", "other/v1", "--json"]) == 0
    assert [r["device"] for r in json.loads(capsys.readouterr().out)] == ["zz"]


def test_no_devices(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--broker", broker.url]) == 0
    assert "no devices under edge/v1/dev/" in capsys.readouterr().out


def test_rows_tolerate_junk() -> None:
    rows = rows_from_retained({
        "edge/v1/dev/a/reported": b"\xff not json",
        "edge/v1/dev/a/state": b'{"state": "online"}',
        "edge/v1/dev/b/reported": b'{"revision": true, "models": [1, {"name": "m"}]}',
        "edge/v1/dev/c/extra/state": b"{}",
    }, "edge/v1")
    assert [r.device for r in rows] == ["a", "b"]
    assert rows[0].state == "online"
    assert rows[1].revision is None
    assert rows[1].models == [{"name": "m"}]


def test_broker_from_environment(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    monkeypatch.setenv("EDGE_FLEET_BROKER", url)
    assert main(["devices"]) == 2
    err = capsys.readouterr().err
    assert err == f"edge-fleet devices: cannot reach broker {url}: [Errno 111] Connection refused\n"


# -- infer --------------------------------------------------------------------------


@pytest.fixture
def responder(broker: Broker) -> Iterator[Responder]:
    r = Responder(broker.url)
    yield r
    r.close()


def test_infer_npy(broker: Broker, responder: Responder, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    x = np.zeros((2, 10), np.float32)
    x[0, 7] = x[1, 2] = 1
    np.save(tmp_path / "x.npy", x)
    rc = main(["infer", "--broker", broker.url, "--device", "gw-1", "--model", "digits",
               "--input", str(tmp_path / "x.npy"), "--input-name", "probs"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "digits:1 via echo/cpu: queue 0.10 ms, infer 0.20 ms, round trip" in out
    assert "probs  FP32 [2, 10]  min 0  max 1" in out
    assert "argmax[-1] [7, 2]" in out


def test_infer_npz_json(broker: Broker, responder: Responder, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "in.npz", a=np.arange(3, dtype=np.int64), b=np.ones(2, np.uint8))
    rc = main(["infer", "--broker", broker.url, "--pool", "cams", "--model", "m",
               "--version", "2", "--input", str(tmp_path / "in.npz"), "--output", "b",
               "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_version"] == "2"
    assert doc["outputs"] == [{"name": "b", "shape": [2], "datatype": "UINT8", "data": [1, 1]}]
    assert responder.received[0][0] == "edge/v1/pool/cams/jobs"


def test_infer_error_exit_1(broker: Broker, responder: Responder, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.zeros(1))
    rc = main(["infer", "--broker", broker.url, "--device", "gw-1", "--model", "missing",
               "--input", str(tmp_path / "x.npy"), "--input-name", "x"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err == "edge-fleet: job failed: NOT_FOUND: model missing is not deployed\n"


def test_infer_timeout_exit_1(broker: Broker, responder: Responder, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.zeros(1))
    rc = main(["infer", "--broker", broker.url, "--device", "gw-1", "--model", "slow",
               "--input", str(tmp_path / "x.npy"), "--input-name", "x", "--timeout", "0.3"])
    assert rc == 1
    assert "no response within 0.3s" in capsys.readouterr().err


@pytest.mark.parametrize(("make", "extra", "message"), [
    ("npy", [], "--input-name"),
    ("none", ["--input-name", "x"], "no such file"),
    ("npz", ["--input-name", "zz"], "has no array 'zz'"),
    ("txt", ["--input-name", "x"], "cannot read"),
])
def test_infer_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str,
                            extra: list[str], message: str) -> None:
    path = tmp_path / f"in.{make}"
    if make == "npy":
        np.save(path, np.zeros(1))
    elif make == "npz":
        np.savez(path, x=np.zeros(1))
    elif make == "txt":
        path.write_text("hello")
    # No broker needed: inputs are checked first.
    rc = main(["infer", "--broker", "mqtt://127.0.0.1:1", "--device", "gw-1", "--model", "m",
               "--input", str(path), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


# -- surface ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["deploy", "devices", "infer", "serve"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: edge-fleet {command}" in out
    assert "--broker URL" in out
    assert "--prefix" in out


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    capsys.readouterr()
    assert main(["infer", "--model", "m", "--input", "x.npy"]) == 2  # argparse's own message
    assert "one of the arguments --device --pool is required" in capsys.readouterr().err
    assert main(["devices", "--prefix", "edge/+"]) == 2
    assert main(["devices", "--prefix", "$SYS/edge"]) == 2
    assert "must not start with '$'" in capsys.readouterr().err
    assert main(["deploy", "--device", "a/b", "--remove", "m"]) == 2


def test_serve_until_sigterm(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"weights")
    port = free_port()
    art = tmp_path / "art"
    env = {**os.environ, "EDGE_FLEET_ARTIFACT_DIR": str(art),
           "EDGE_FLEET_STATE_DIR": str(tmp_path / "fleet-state"),  # the controller's registry
           # No broker answers there: artifacts are served all the same, and the test does not
           # lean on a broker that happens to run on the default port.
           "EDGE_FLEET_BROKER": f"mqtt://127.0.0.1:{free_port()}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeinfer.fleet.cli", "serve", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_port(port, 5)
        from edgeinfer.fleet.artifacts import ArtifactStore

        a = ArtifactStore(art).put_file(blob)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/artifacts/sha256/{a.sha256}", timeout=5
        ) as resp:
            assert resp.read() == b"weights"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"at http://127.0.0.1:{port}/artifacts/sha256/<hex>" in out.decode()
