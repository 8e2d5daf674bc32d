from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_defaults_fit_a_gateway() -> None:
    cfg = load_config(None, {})
    assert cfg.broker.url == "mqtt://127.0.0.1:1883"
    assert cfg.state_dir == "/var/lib/edge-agent"
    assert cfg.telemetry.interval_s == 30
    assert cfg.runtime.prefer == ["auto"]  # tuned at deploy (runtimes/autotune.py)
    assert cfg.reply_prefixes_resolved() == ("edge/v1/reply/",)


def test_file_values_are_typed(tmp_path: Path) -> None:
    p = write(tmp_path, "device_id: gw-7\nbroker:\n  url: mqtts://b.example:8884\njobs:\n  workers: 3\n")
    cfg = load_config(p, {})
    assert (cfg.device_id, cfg.broker.url, cfg.jobs.workers) == ("gw-7", "mqtts://b.example:8884", 3)


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ("broker:\n  keepalive: 3\n", "broker.keepalive", "unknown key"),
        ("colour: blue\n", "colour", "unknown key"),
        ("jobs:\n  workers: many\n", "jobs.workers", "expected an integer >= 1 and <= 64, got 'many'"),
        ("broker:\n  url: http://x\n", "broker.url", "mqtt://"),
        ("device_id: 'a b'\n", "device_id", "must match"),
        ("telemetry:\n  interval_s: -1\n", "telemetry.interval_s", ">"),
    ],
)
def test_bad_key_names_key_and_file(tmp_path: Path, text: str, key: str, what: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, {})
    message = str(info.value)
    assert str(p) in message
    assert f"'{key}'" in message
    assert what in message


def test_key_given_twice_names_the_key_and_both_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "device_id: gw-1\nbroker:\n  url: mqtt://a:1883\n  keepalive_s: 5\n"
                        "  url: mqtt://b:1883\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, {})
    assert str(info.value) == (
        f"{p}: line 5: key 'url' is given twice (lines 3 and 5); YAML would keep only the last, "
        "so one of them is a mistake")
    # A merge key's mapping may be overridden on purpose: not a duplicate.
    p = write(tmp_path, "broker:\n  <<: {url: 'mqtt://a:1883', keepalive_s: 5}\n  url: mqtt://b:1883\n")
    assert load_config(p, {}).broker.url == "mqtt://b:1883"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", {})


def test_environment_overrides_file(tmp_path: Path) -> None:
    p = write(tmp_path, "device_id: from-file\nbroker:\n  url: mqtt://file:1883\n")
    env = {
        "EDGE_AGENT_DEVICE_ID": "1234",  # stays a string though it looks like a number
        "EDGE_AGENT_BROKER__URL": "mqtt://env:1999",
        "EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
        "EDGE_AGENT_JOBS__WORKERS": "4",
    }
    cfg = load_config(p, env)
    assert cfg.device_id == "1234"
    assert cfg.broker.url == "mqtt://env:1999"
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.jobs.workers == 4


def test_environment_typo_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"broker\.ur'"):
        load_config(None, {"EDGE_AGENT_BROKER__UR": "mqtt://x:1"})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    p = write(tmp_path, "jobs:\n  queue_size: lots\n")
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert res.returncode == 2
    assert "jobs.queue_size" in res.stderr and str(p) in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2
    assert "not found" in res.stderr and "Traceback" not in res.stderr


def test_cli_validate_config_ok(tmp_path: Path) -> None:
    p = write(tmp_path, f"device_id: gw1\nstate_dir: {tmp_path}/s\n")
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert res.returncode == 0, res.stderr
    assert "config OK" in res.stdout
    assert not (tmp_path / "s").exists()  # validation writes nothing
