from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeinfer.agent.config import ConfigError, load_config


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
        f"{p}: line 5: key 'broker.url' is given twice (lines 3 and 5); YAML would keep only the last, "
        "so one of them is a mistake")
    p = write(tmp_path, "jobs: {workers: 2, workers: 3}\n")  # twice on one line, too
    with pytest.raises(ConfigError, match=r"line 1: key 'jobs.workers' is given twice on line 1;"):
        load_config(p, {})
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
        [sys.executable, "-m", "edgeinfer.agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_cli_bad_config_exits_2_from_validate_and_78_from_run(tmp_path: Path) -> None:
    p = write(tmp_path, "jobs:\n  queue_size: lots\n")
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert "jobs.queue_size" in line and str(p) in line
    # The daemon: EX_CONFIG, which systemd/edge-agent.service does not restart on.
    res = run_cli("run", "--config", str(p))
    assert res.returncode == 78
    assert "jobs.queue_size" in one_line(res.stderr)
    res = run_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 78
    assert "not found" in one_line(res.stderr)


def test_validate_config_refuses_a_state_dir_that_cannot_be_created(tmp_path: Path) -> None:
    # Root writes anywhere; nobody creates a folder under a regular file.
    (tmp_path / "file").write_text("")
    p = write(tmp_path, f"state_dir: {tmp_path}/file/state\n")
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert f"{p}: key 'state_dir': {tmp_path}/file/state cannot be created" in line
    assert "not a folder" in line
    res = run_cli("run", "--config", str(p))
    assert res.returncode == 78
    assert "key 'state_dir'" in one_line(res.stderr)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["agent.yaml", "file"]


def test_validate_config_refuses_tls_files_it_cannot_read(tmp_path: Path) -> None:
    p = write(tmp_path, f"state_dir: {tmp_path}/s\nbroker:\n  url: mqtts://127.0.0.1:8883\n"
                        f"  tls:\n    ca_file: {tmp_path}/ca.pem\n")
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert res.returncode == 2
    assert f"key 'broker.tls.ca_file': {tmp_path}/ca.pem: no such file" in one_line(res.stderr)
    (tmp_path / "ca.pem").mkdir()  # root reads a 0000 file; nobody reads a folder as one
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert "key 'broker.tls.ca_file'" in one_line(res.stderr) and "not a file" in res.stderr


def test_environment_checks_open_the_files(tmp_path: Path) -> None:
    """What load_config's is_file() cannot see: a file that exists and will not open."""
    import msgspec

    from edgeinfer.agent.preflight import environment_problems

    cfg = load_config(None, {"EDGE_AGENT_STATE_DIR": str(tmp_path / "s")})
    assert environment_problems(cfg) == []
    tls = msgspec.structs.replace(cfg.broker.tls, ca_file=str(tmp_path))  # a folder
    cfg = msgspec.structs.replace(cfg, broker=msgspec.structs.replace(cfg.broker, tls=tls))
    [problem] = environment_problems(cfg)
    assert problem.lasting and str(problem).startswith(
        f"key 'broker.tls.ca_file': {tmp_path} cannot be read (")


def test_validate_config_refuses_a_broker_host_that_does_not_resolve(tmp_path: Path) -> None:
    p = write(tmp_path, f"state_dir: {tmp_path}/s\nbroker:\n  url: mqtt://broker.edge.invalid:1883\n")
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert res.returncode == 2
    assert "key 'broker.url': host 'broker.edge.invalid' does not resolve" in one_line(res.stderr)


def test_run_turns_a_state_dir_it_cannot_create_into_one_line_and_78(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Past the checks (a race, or what they cannot foresee), start-up's OSError is still 78."""
    from edgeinfer.agent import cli

    (tmp_path / "file").write_text("")
    p = write(tmp_path, f"state_dir: {tmp_path}/file/state\n")
    monkeypatch.setattr(cli, "environment_problems", lambda cfg: [])
    assert cli.main(["run", "--config", str(p)]) == 78
    line = one_line(capsys.readouterr().err)
    assert f"key 'state_dir': cannot set up {tmp_path}/file/state (Not a directory" in line


def test_cli_validate_config_ok(tmp_path: Path) -> None:
    p = write(tmp_path, f"device_id: gw1\nstate_dir: {tmp_path}/s\n")
    res = run_cli("run", "--config", str(p), "--validate-config")
    assert res.returncode == 0, res.stderr
    assert "config OK" in res.stdout
    assert not (tmp_path / "s").exists()  # validation writes nothing


# Issue 12, point 8: what a config may hold that would otherwise fail far from the file
# (in the IDNA codec while connecting, in a topic) or open the topic tree to clients.
@pytest.mark.parametrize(
    ("content", "env", "key", "what"),
    [
        # Bytes that are not UTF-8: the whole file is refused, naming it.
        (b"device_id: gw\xff\xfe1\n", {}, None, "not UTF-8 text"),
        # A YAML escape of a lone surrogate, and an environment variable holding such bytes.
        (b'broker:\n  url: "mqtt://\\udcff:1883"\n', {}, "broker.url", "not valid text"),
        (b"device_id: gw-1\n", {"EDGE_AGENT_TOPIC_PREFIX": "a\udcffb"}, "topic_prefix",
         "not valid text"),
        (b"device_id: gw-1\x00\n", {}, None, "not allowed in YAML text"),
        (b"topic_prefix: $SYS/x\n", {}, "topic_prefix", "must not start with '$'"),
        (b"topic_prefix: edge//v1\n", {}, "topic_prefix", "empty level"),
        (b"jobs:\n  reply_prefixes: ['$share/x/']\n", {}, "jobs.reply_prefixes[0]",
         "must not start with '$'"),
        (b"jobs:\n  reply_prefixes: [edge/v1/reply]\n", {}, "jobs.reply_prefixes[0]",
         "must end with '/'"),
        (b"jobs:\n  reply_prefixes: ['{prefix}/reply/', edge/v1/]\n", {},
         "jobs.reply_prefixes[1]", "another device's topics"),
        (b"jobs:\n  reply_prefixes: [edge/]\n", {}, "jobs.reply_prefixes[0]",
         "another device's topics"),
    ],
)
def test_run_refuses_config_text_that_cannot_work(
    tmp_path: Path, content: bytes, env: dict[str, str], key: str | None, what: str
) -> None:
    p = tmp_path / "agent.yaml"
    p.write_bytes(content)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    environ["EDGE_AGENT_STATE_DIR"] = str(tmp_path / "state")
    # subprocess writes a lone surrogate escape as its byte (0xff here): the child sees
    # what a variable that is not UTF-8 gives Python.
    environ.update(env)
    res = subprocess.run([sys.executable, "-m", "edgeinfer.agent.cli", "run", "--config", str(p)],
                         capture_output=True, text=True, timeout=60, env=environ,
                         errors="backslashreplace")
    assert res.returncode == 78, res.stderr
    line = one_line(res.stderr)
    assert str(p) in line
    if key is not None:
        assert f"key '{key}'" in line
    assert what in line


def test_a_reply_prefix_beside_the_device_tree_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "jobs:\n  reply_prefixes: ['{prefix}/reply/', apps/replies/]\n"), {})
    assert cfg.reply_prefixes_resolved() == ("edge/v1/reply/", "apps/replies/")
