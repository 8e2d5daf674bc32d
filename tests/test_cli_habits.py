"""What both command lines do alike (issue 10, "CLI habits"): `--version`, one way to
write a duration, nothing written by a command that fails on its arguments, and broker
options only on the commands that talk to a broker."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edgeinfer.cliargs import parse_duration
from edgeinfer.fleet.cli import build_parser, main

# -- --version ------------------------------------------------------------------------------


def _run(module: str, *args: str, cwd: Path | None = None,
         home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a clean environment: no EDGE_FLEET_*/EDGE_AGENT_* settings, and
    HOME (where the fleet keeps its registry and artifacts by default) where the test says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_FLEET_", "EDGE_AGENT_"))}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def test_both_commands_say_the_installed_version() -> None:
    installed = importlib.metadata.version("edgeinfer")
    for module, prog in (("edgeinfer.agent.cli", "edge-agent"), ("edgeinfer.fleet.cli", "edge-fleet")):
        done = _run(module, "--version")
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{prog} {installed}\n", "")
    # The old subcommand stays, and says the same.
    assert _run("edgeinfer.agent.cli", "version").stdout == f"edge-agent {installed}\n"


# -- durations ------------------------------------------------------------------------------


def test_one_duration_syntax() -> None:
    for text, seconds in (("60", 60), ("1.5", 1.5), ("60s", 60), ("2m", 120), ("500ms", 0.5),
                          ("1h", 3600), (" 3 s ", 3)):
        assert parse_duration(text) == seconds, text
    for bad in ("soon", "", "-5", "5x", "1.2.3", "s"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad, "--wait")


# (argv, the option's destination): every option that takes a duration.
_DURATION_OPTIONS = [
    (["deploy", "--device", "gw-1", "--remove", "m", "--wait"], "wait"),
    (["infer", "--device", "gw-1", "--model", "m", "--input", "x.npy", "--timeout"], "timeout"),
    (["models", "describe", "--device", "gw-1", "--model", "m", "--timeout"], "timeout"),
    (["rollout", "start", "m:1", "--group", "", "--bake"], "bake"),
    (["rollout", "start", "m:1", "--group", "", "--install-timeout"], "install_timeout"),
    (["simulate", "--devices", "1", "--report-every"], "report_every"),
    (["simulate", "--devices", "1", "--duration"], "duration"),
]


@pytest.mark.parametrize(("argv", "dest"), _DURATION_OPTIONS)
def test_every_duration_option_reads_durations_alike(argv: list[str], dest: str) -> None:
    parser = build_parser()
    for text, seconds in (("60", 60), ("60s", 60), ("2m", 120), ("500ms", 0.5), ("1h", 3600)):
        assert getattr(parser.parse_args([*argv, text]), dest) == seconds


@pytest.mark.parametrize(("argv", "dest"), _DURATION_OPTIONS)
def test_a_bad_duration_is_one_line_naming_the_option(
        argv: list[str], dest: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"argument {argv[-1]}: 'soon' is not a duration" in err


def test_defaults_are_durations_too() -> None:
    args = build_parser().parse_args(["rollout", "start", "m:1", "--group", ""])
    assert (args.bake, args.install_timeout) == (60, 300)
    assert build_parser().parse_args(["simulate", "--devices", "1"]).report_every == 10


# -- a command that fails on its arguments writes nothing -------------------------------------


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not really onnx, but bytes to store")
    return path


# Each: the arguments ({model} is an existing file outside HOME and cwd), and words the
# one-line error must hold.
_BAD = [
    (["rollout", "start", "digits:4", "--group", "site=berlin"], "push it first"),
    (["rollout", "start", "digits", "--group", "site=berlin"], "say NAME:VERSION"),
    (["rollout", "start", "digits:4", "--group", "site=berlin", "--bake", "soon"],
     "argument --bake"),
    (["rollout", "start", "digits:4", "--group", "site=berlin", "--waves", "0,100%"],
     "every wave must add devices"),
    (["rollout", "start", "digits:4", "--group", "site=="], "site=="),
    (["rollout", "start", "digits:4", "--group", "", "--drive", "--broker", "ftp://x"],
     "mqtt://"),
    (["rollout", "status", "1"], "no rollout 1"),
    (["rollout", "pause", "1"], "no rollout 1"),
    (["rollout", "abort", "1"], "no rollout 1"),
    (["deploy", "--device", "gw-1", "--model", "m", "--version", "1", "--file", "nope.onnx"],
     "no such file"),
    (["deploy", "--device", "gw-1", "--model", "m/x", "--version", "1", "--file", "{model}"],
     "model name"),
    (["deploy", "--device", "gw-1", "--model", "m", "--version", "1", "--file", "{model}",
      "--sign-key", "nope.key"], "nope.key"),
    (["deploy", "--device", "gw-1", "--model", "m", "--version", "1", "--file", "{model}",
      "--broker", "ftp://x"], "mqtt://"),
    (["deploy", "--device", "gw-1", "--model", "m", "--version", "1", "--file", "{model}",
      "--with", "tokenizer.json"], "NAME=PATH"),
    (["models", "push", "{model}", "--name", "a b", "--version", "1"], "model name"),
    (["models", "push", "nope.onnx", "--name", "m", "--version", "1"], "no such file"),
    (["models", "push", "{model}", "--name", "m", "--version", "1", "--labels", "nope.txt"],
     "no such file"),
    (["devices", "label", "gw-1", "b@d=x"], "key 'b@d'"),
    (["devices", "label", "gw/1", "a=b"], "device id"),
    (["keys", "generate", "--key-id", "a b", "--out", "keys"], "key id"),
    (["keys", "generate", "--key-id", "k", "--out", "keys", "--broker", "mqtt://x:1"],
     "unrecognized arguments: --broker"),
    (["serve", "--broker", "ftp://x"], "mqtt://"),
    (["simulate", "--devices", "2", "--install-delay", "soon"], "--install-delay"),
]


@pytest.mark.parametrize(("argv", "says"), _BAD, ids=[" ".join(a[:2]) + f" {i}"
                                                      for i, (a, _) in enumerate(_BAD)])
def test_a_command_that_fails_on_its_arguments_writes_nothing(
        argv: list[str], says: str, tmp_path: Path, model: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    done = _run("edgeinfer.fleet.cli", *[a.replace("{model}", str(model)) for a in argv],
                cwd=cwd, home=home)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert done.stderr.startswith("edge-fleet")
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []


def test_reading_a_registry_nobody_made_does_not_make_it(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    registry = home / ".local" / "share" / "edgeinfer" / "fleet" / "registry.sqlite3"
    for argv, out in ((["models", "list"], f"no models in {registry}\n"),
                      (["rollout", "status"], f"no rollouts in {registry}\n"),
                      (["devices", "label", "gw-1"], "gw-1: (no labels)\n")):
        done = _run("edgeinfer.fleet.cli", *argv, cwd=cwd, home=home)
        assert (done.returncode, done.stdout, done.stderr) == (0, out, "")
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    # Writing does make it, where the defaults say.
    assert _run("edgeinfer.fleet.cli", "devices", "label", "gw-1", "a=b", cwd=cwd, home=home).returncode == 0
    assert registry.is_file()


# -- broker options only where a broker is used -------------------------------------------------

_BROKER_OPTIONS = ("--broker", "--prefix", "--ca-file", "--cert-file", "--key-file",
                   "--username", "--password-file")


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("argv", "rest"), [
    (["keys", "generate"], ["--key-id", "k", "--out", "keys"]),
    (["models", "push"], ["m.onnx", "--name", "m", "--version", "1"]),
    (["models", "list"], []),
    (["devices", "label"], ["gw-1"]),
    (["rollout", "status"], ["1"]),
    (["rollout", "pause"], ["1"]),
])
def test_commands_that_never_connect_take_no_broker_options(
        argv: list[str], rest: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(argv, capsys)
    assert "--verbose" in text
    for option in _BROKER_OPTIONS:
        assert option not in text, option
    assert main([*argv, *rest, "--ca-file", "ca.pem"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --ca-file ca.pem" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["deploy"], ["devices"], ["infer"], ["serve"], ["simulate"],
                                  ["rollout", "start"], ["rollout", "resume"],
                                  ["rollout", "abort"], ["models", "describe"]])
def test_commands_that_connect_list_every_broker_option(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(argv, capsys)
    for option in _BROKER_OPTIONS:
        assert option in text, option


# -- the documented examples still parse ----------------------------------------------------


def _examples(path: Path, prog: str) -> list[list[str]]:
    """The indented `prog ...` command lines of a markdown file, continuations joined and
    trailing comments dropped."""
    lines, out = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if not line.strip().startswith(f"{prog} ") or not line.startswith("    "):
            continue
        text, after = line, i
        while text.endswith("\\"):
            after += 1
            text = text[:-1] + lines[after]
        out.append(shlex.split(text.split("  #")[0])[1:])
    return out


def test_the_documented_examples_parse() -> None:
    repo = Path(__file__).resolve().parent.parent
    examples = [argv for doc in ("README.md", "docs/pipelines.md")  # whole commands, no synopses
                for argv in _examples(repo / doc, "edge-fleet")]
    assert len(examples) > 15
    parser = build_parser()
    for argv in examples:
        assert parser.parse_args(argv).func is not None, argv
