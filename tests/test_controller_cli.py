"""`edge-fleet models push/list`, `devices label` and `serve --config` (the controller)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edgeinfer.fleet.cli import main
from edgeinfer.fleet.fleetconfig import ConfigError, load_fleet_config
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.registry import open_registry
from tests.broker import Broker, free_port, wait_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(registry_target: str) -> str:
    """The --db value, once per backend (registry_target: tests/conftest.py)."""
    return registry_target


@pytest.fixture
def model(tmp_path: Path) -> Path:
    f = tmp_path / "model.onnx"
    f.write_bytes(b"onnx" * 100)
    return f


def test_models_push_and_list(db: str, model: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "art"
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    push = ["models", "push", str(model), "--name", "digits", "--version", "1", "--db", db,
            "--artifact-dir", str(art)]
    assert main([*push, "--task", "classification", "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stored digits:1 sha256 ")
    # Same bytes again: a no-op.
    assert main([*push, "--task", "classification", "--labels", str(labels)]) == 0
    assert "already stored with these bytes" in capsys.readouterr().out
    # Other bytes under the same name:version: refused, and nothing new in the store.
    before = sorted(p.name for p in (art / "sha256").iterdir())
    model.write_bytes(b"other")
    assert main(push) == 1
    err = capsys.readouterr().err
    assert "edge-fleet models push: model digits:1 already exists with sha256" in err
    assert sorted(p.name for p in (art / "sha256").iterdir()) == before
    assert main(["models", "push", str(model), "--name", "digits", "--version", "2",
                 "--db", db, "--artifact-dir", str(art)]) == 0
    capsys.readouterr()

    assert main(["models", "list", "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "TASK", "SIZE", "SHA256", "LABELS", "CREATED"]
    assert lines[1].split()[:4] == ["digits", "1", "classification", "400"]
    assert lines[2].split()[:4] == ["digits", "2", "tensor", "5"]
    assert lines[2].split()[5] == "-"
    assert main(["models", "list", "--db", db, "--json", "--name", "digits"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["version"] for m in doc] == ["1", "2"]
    stored = art / "sha256" / doc[0]["sha256"]
    assert stored.read_bytes() == b"onnx" * 100
    assert (art / "sha256" / doc[0]["labels_sha256"]).read_text() == "cat\ndog\n"


def test_models_usage_errors(tmp_path: Path, model: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "r.sqlite3")
    base = ["--db", db, "--artifact-dir", str(tmp_path / "art")]
    assert main(["models", "push", str(tmp_path / "nope.onnx"), "--name", "m", "--version",
                 "1", *base]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["models", "push", str(model), "--name", "m/x", "--version", "1", *base]) == 2
    assert "model name 'm/x' must match" in capsys.readouterr().err
    assert main(["models", "list", "--db", db]) == 0
    assert capsys.readouterr().out.startswith("no models in ")
    assert main(["models"]) == 2


def test_devices_label(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "label", "gw-1", "site=berlin", "tier=canary", "--db", db]) == 0
    assert capsys.readouterr().out == "gw-1: site=berlin tier=canary\n"
    assert main(["devices", "label", "gw-1", "tier-", "--db", db]) == 0
    assert capsys.readouterr().out == "gw-1: site=berlin\n"
    assert main(["devices", "label", "gw-1", "--db", db]) == 0
    assert capsys.readouterr().out == "gw-1: site=berlin\n"
    assert main(["devices", "label", "gw-2", "--db", db]) == 0
    assert capsys.readouterr().out == "gw-2: (no labels)\n"
    assert main(["devices", "label", "gw-1", "oops", "--db", db]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["devices", "label", "a/b", "x=y", "--db", db]) == 2
    reg = open_registry(db)
    try:
        dev = reg.device("gw-1")
        assert dev is not None
        assert dev.labels == {"site": "berlin"}
    finally:
        reg.close()


def test_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'st'}\nhttp: {{port: 9}}\n")
    loaded = load_fleet_config(cfg)
    assert loaded.database_target() == str(tmp_path / "st" / "registry.sqlite3")
    assert loaded.http.port == 9
    cfg.write_text("http: {prot: 9}\n")
    with pytest.raises(ConfigError, match=r"fleet.yaml: key 'http.prot': unknown key"):
        load_fleet_config(cfg)
    cfg.write_text("broker: {client_id: a/b}\n")
    with pytest.raises(ConfigError, match=r"broker\.client_id"):
        load_fleet_config(cfg)
    # The CLI uses the config's database.
    cfg.write_text(f"state_dir: {tmp_path / 'st'}\n")
    assert main(["devices", "label", "gw-1", "a=b", "--config", str(cfg)]) == 0
    assert (tmp_path / "st" / "registry.sqlite3").is_file()
    assert main(["models", "list", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_config_key_given_twice_names_it_and_both_lines(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("http:\n  port: 9\nprefix: edge/v1\nhttp:\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError, match=r"fleet.yaml: line 4: key 'http' is given twice "
                                          r"\(lines 1 and 4\)"):
        load_fleet_config(cfg, {})


def test_environment_overrides_every_key(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'file-state'}\nhttp: {{port: 9}}\n"
                   "broker: {url: 'mqtt://file:1883'}\n")
    env = {
        "EDGE_FLEET_BROKER__URL": "mqtt://env:1884",
        "EDGE_FLEET_BROKER__CLIENT_ID": "1234",  # stays a string though it looks like a number
        "EDGE_FLEET_HTTP__PORT": "8999",
        "EDGE_FLEET_EVENTS__KEEP": "5",
        "EDGE_FLEET_PREFIX": "site/v1",
        # Not overrides: the --broker default, a flag's default, and a default-only key.
        "EDGE_FLEET_BROKER": "mqtt://flag:1",
        "EDGE_FLEET_CA_FILE": "/nowhere/ca.pem",
        "EDGE_FLEET_STATE_DIR": str(tmp_path / "env-state"),
    }
    loaded = load_fleet_config(cfg, env)
    assert loaded.broker.url == "mqtt://env:1884" and loaded.broker.client_id == "1234"
    assert (loaded.http.port, loaded.events.keep, loaded.prefix) == (8999, 5, "site/v1")
    assert loaded.state_path() == tmp_path / "file-state"  # the file's wins over the default
    with pytest.raises(ConfigError, match=r"EDGE_FLEET_\* environment: key 'http.port': "
                                          r"expected an integer >= 0 and <= 65535, got 'lots'"):
        load_fleet_config(cfg, {"EDGE_FLEET_HTTP__PORT": "lots"})
    with pytest.raises(ConfigError, match=r"key 'broker.ur': unknown key"):
        load_fleet_config(None, {"EDGE_FLEET_BROKER__UR": "mqtt://x:1"})


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_serve_runs_the_controller(broker: Broker, tmp_path: Path, model: Path) -> None:
    port = free_port()
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(
        f"broker: {{url: '{broker.url}', client_id: ctl-cli}}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"artifact_dir: {tmp_path / 'art'}\n"
        f"http: {{host: 127.0.0.1, port: {port}}}\n"
    )
    assert main(["models", "push", str(model), "--name", "m", "--version", "1",
                 "--config", str(cfg)]) == 0
    with connect(broker.url) as conn:
        conn.publish("edge/v1/dev/gw-1/state", b'{"state": "online", "session_id": "s9"}',
                     retain=True).result(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_FLEET_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeinfer.fleet.cli", "serve", "--config", str(cfg)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_port(port, 10)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while not (devices := _get_json(f"{base}/api/devices")["devices"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert devices[0]["device_id"] == "gw-1"
        assert devices[0]["session_id"] == "s9"
        models = _get_json(f"{base}/api/models")["models"]
        assert [(m["name"], m["version"]) for m in models] == [("m", "1")]
        with urllib.request.urlopen(f"{base}/artifacts/sha256/{models[0]['sha256']}",
                                    timeout=5) as resp:
            assert resp.read() == model.read_bytes()
        assert _get_json(f"{base}/api/status")["connected"] is True
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    text = out.decode()
    assert f"at http://127.0.0.1:{port}/artifacts/sha256/<hex>" in text
    assert f"controller: devices under edge/v1/dev/ on {broker.url}" in text


def test_example_config_loads() -> None:
    cfg = load_fleet_config(REPO / "deploy" / "fleet.example.yaml")
    assert cfg.broker.client_id == "edge-fleet-controller"
    assert cfg.database_target() == "/var/lib/edge-fleet/registry.sqlite3"


def test_config_refuses_a_broker_topic_prefix_and_text_that_is_not_text(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("prefix: $SYS/edge\n")
    with pytest.raises(ConfigError, match=r"key 'prefix': '\$SYS/edge' must not start with '\$'"):
        load_fleet_config(cfg, {})
    cfg.write_bytes(b"http: {host: '\xff'}\n")
    with pytest.raises(ConfigError, match=r"fleet.yaml: cannot read config file: not UTF-8 text"):
        load_fleet_config(cfg, {})
    with pytest.raises(ConfigError, match=r"key 'http.host': not valid text"):
        load_fleet_config(None, {"EDGE_FLEET_HTTP__HOST": "\udcff"})
