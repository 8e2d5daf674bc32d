"""deploy/install.sh into a throwaway root, and the controller's unit file.

No user is created and systemctl is never run here: `--root` prints those commands. The
virtual environment is this checkout's own (`--venv-from`), so a run takes a second or two.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "deploy" / "install.sh"
FLEET_UNIT = REPO / "systemd" / "edge-fleet.service"
VENV = Path(sys.executable).parent.parent  # the environment running the tests

pytestmark = pytest.mark.timeout(120)


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def tree(root: Path) -> dict[str, tuple[int, float, bool]]:
    """path -> (mode, mtime, is symlink) of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_mtime,
                                             p.is_symlink())
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dry_run_prints_the_steps_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "gw"
    proc = install("--root", str(root), "--dry-run", "--device-id", "gw-7")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in ("edge-agent.conf", "systemd-sysusers", "python3 -m venv", "pip install",
                 "etc/edge-agent/agent.yaml", "edge-agent.service", "systemctl daemon-reload",
                 "systemctl enable --now edge-agent"):
        assert step in out, f"{step!r} not in:\n{out}"
    assert all(line.startswith(("would: ", "== ", "ok: ", "no broker", "dry run"))
               for line in out.splitlines()), out
    assert not root.exists()

    # Into an existing root too: nothing is written there.
    root.mkdir()
    (root / "marker").write_text("x")
    before = tree(root)
    assert install("--root", str(root), "--dry-run").returncode == 0
    assert tree(root) == before


def test_install_into_a_root_lays_out_the_files_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "gw"
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    args = ("--root", str(root), "--venv-from", str(VENV), "--device-id", "gw-7",
            # A name that resolves here: --validate-config checks that the broker's does.
            "--broker", "mqtts://localhost:8883", "--password-file", str(password))
    first = install(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    # System actions are printed, not run.
    assert "skipped (--root): systemctl enable --now edge-agent" in first.stdout
    assert "config OK: device gw-7" in first.stdout + first.stderr  # the agent validated it

    conf = root / "etc/edge-agent/agent.yaml"
    cred = root / "etc/credstore/mqtt-password"
    unit = root / "etc/systemd/system/edge-agent.service"
    assert mode(conf) == 0o640 and mode(conf.parent) == 0o750
    assert mode(cred) == 0o600 and mode(cred.parent) == 0o700
    assert cred.read_text() == "s3cret"
    assert mode(unit) == 0o644 and unit.read_bytes() == (REPO / "systemd/edge-agent.service").read_bytes()
    assert (root / "usr/lib/sysusers.d/edge-agent.conf").is_file()
    venv = root / "opt/edgeinfer/.venv"
    assert venv.is_symlink() and (venv / "bin/edge-agent").exists()
    doc = yaml.safe_load(conf.read_text())
    assert doc["device_id"] == "gw-7" and doc["broker"]["url"] == "mqtts://localhost:8883"

    # Again: nothing changes (same files, same times).
    before = tree(root)
    second = install(*args)
    assert second.returncode == 0, second.stderr
    assert "done: 0 changes" in second.stdout, second.stdout
    assert tree(root) == before

    # An operator's edit of the config survives a re-install; a changed unit is replaced.
    conf.write_text(conf.read_text().replace("workers: 2", "workers: 3"))
    unit.write_text("# stale\n")
    third = install(*args[:4], "--device-id", "other")
    assert third.returncode == 0, third.stderr
    assert "workers: 3" in conf.read_text() and "device_id: gw-7" in conf.read_text()
    assert unit.read_bytes() == (REPO / "systemd/edge-agent.service").read_bytes()
    assert "skipped (--root): systemctl daemon-reload" in third.stdout


def test_install_refuses_bad_input(tmp_path: Path) -> None:
    bad = install("--root", str(tmp_path / "r"), "--dry-run", "--device-id", "no/slash")
    assert bad.returncode == 2 and "device id" in bad.stderr
    bad = install("--root", str(tmp_path / "r"), "--dry-run", "--broker", "mqtt://x|y")
    assert bad.returncode == 2 and "--broker" in bad.stderr
    assert install("--bogus").returncode == 2


def test_installed_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart= exists: point it at a binary this machine has.
    text = FLEET_UNIT.read_text().replace("/opt/edgeinfer/.venv/bin/edge-fleet", "/bin/true")
    unit = tmp_path / "edge-fleet.service"
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, out
    assert str(unit) not in out and "edge-fleet.service" not in out, out


def test_fleet_unit_matches_the_controller() -> None:
    service: dict[str, str] = {}
    section = None
    for line in FLEET_UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            service.setdefault(key, value)
    assert service["ExecStart"].endswith("edge-fleet serve --config /etc/edge-fleet/fleet.yaml")
    assert service["User"] == "edge-fleet" and service["StateDirectory"] == "edge-fleet"
    # deploy/fleet.example.yaml keeps the registry and the artifacts in the state directory.
    example = yaml.safe_load((REPO / "deploy/fleet.example.yaml").read_text())
    assert example["state_dir"] == "/var/lib/edge-fleet"
    assert example["artifact_dir"].startswith("/var/lib/edge-fleet/")
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["RestartPreventExitStatus"] == "2"
    assert "edge-fleet" in (REPO / "systemd/edge-fleet.sysusers").read_text()


# -- install sets from the lock ---------------------------------------------------------------
# Real virtual environments, filled from uv.lock by uv (scripts/uv.sh) out of its cache: a
# few seconds each once the wheels are cached, a few minutes on a machine's first run.
UV = REPO / "scripts" / "uv.sh"
SLOW_INSTALL_S = 600


def distributions(venv: Path) -> set[str]:
    out = subprocess.run(
        [str(venv / "bin/python"), "-c",
         "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'].lower() "
         "for d in m.distributions()))"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    return set(out.split())


def run_in(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    # From a folder outside the checkout, so that only the installed package is importable.
    return subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, cwd=venv)


@pytest.mark.timeout(SLOW_INSTALL_S + 60)
def test_install_with_extras_media_and_ocr_fills_the_venv_from_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "gw"
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--device-id", "gw-8",
                           "--extras", "media,ocr"],
                          capture_output=True, text=True, timeout=SLOW_INSTALL_S, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--require-hashes" in proc.stdout  # the lock's hashes are checked
    venv = root / "opt/edgeinfer/.venv"
    names = distributions(venv)
    assert {"edgeinfer", "onnxruntime", "openvino", "pillow", "soundfile", "tokenizers",
            "opencv-python-headless", "aiohttp"} <= names, names  # aiohttp: http.listen
    # Never the dev group, nor what the lock's overrides took away.
    assert not names & {"pytest", "torch", "opencv-python", "onnxruntime-gpu"}, names
    # Exactly the locked releases.
    lock = (REPO / "uv.lock").read_text()
    for name in ("onnxruntime", "openvino", "msgspec"):
        version = subprocess.run([str(venv / "bin/python"), "-c",
                                  f"import importlib.metadata as m; print(m.version({name!r}))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert f'name = "{name}"\nversion = "{version}"' in lock, (name, version)
    imported = run_in(venv, "import PIL, soundfile, tokenizers, cv2, onnxruntime, openvino; "
                            "import edgeinfer.agent.cli, edgeinfer.runtimes.pipelines.ocr; "
                            "import edgeinfer.agent.http_endpoint; print('ok')")
    assert imported.stdout.strip() == "ok", imported.stderr
    # Again with the same extras: nothing to do.
    again = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--device-id", "gw-8",
                            "--extras", "media,ocr"],
                           capture_output=True, text=True, timeout=SLOW_INSTALL_S, check=False)
    assert again.returncode == 0 and "done: 0 changes" in again.stdout, again.stdout + again.stderr


@pytest.mark.timeout(SLOW_INSTALL_S + 60)
def test_install_gpu_brings_onnxruntime_gpu_instead_of_the_cpu_build(tmp_path: Path) -> None:
    root = tmp_path / "gw"
    args = ["bash", str(INSTALL), "--root", str(root), "--device-id", "gw-9"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=SLOW_INSTALL_S, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    venv = root / "opt/edgeinfer/.venv"
    assert "onnxruntime" in distributions(venv)
    # Switching an installed gateway to the GPU build takes the CPU build away: both
    # install the module `onnxruntime`, and the last one written would win.
    gpu = subprocess.run([*args, "--gpu"], capture_output=True, text=True, timeout=SLOW_INSTALL_S,
                         check=False)
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    names = distributions(venv)
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names, names
    providers = run_in(venv, "import onnxruntime; print(onnxruntime.get_available_providers())")
    assert "CUDAExecutionProvider" in providers.stdout, providers.stdout + providers.stderr


def test_install_refuses_unknown_extras_and_lists_them_in_a_dry_run(tmp_path: Path) -> None:
    bad = install("--root", str(tmp_path / "r"), "--dry-run", "--extras", "media,gpu")
    assert bad.returncode == 2 and "unknown extra 'gpu'" in bad.stderr, bad.stderr
    bad = install("--root", str(tmp_path / "r"), "--dry-run", "--extras", "agent")
    assert bad.returncode == 2 and "--gpu" in bad.stderr, bad.stderr
    dry = install("--root", str(tmp_path / "r"), "--dry-run", "--gpu", "--extras", "ocr,media,ocr")
    assert dry.returncode == 0, dry.stderr
    assert "--extra agent-gpu --extra ocr --extra media (from" in dry.stdout, dry.stdout
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(SLOW_INSTALL_S + 60)
def test_the_base_install_is_the_job_client_and_edge_fleet_without_runtimes(tmp_path: Path) -> None:
    venv = tmp_path / "client"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}

    def uv(*args: str) -> None:
        proc = subprocess.run([str(UV), *args], capture_output=True, text=True, env=env,
                              timeout=SLOW_INSTALL_S, check=False, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    uv("venv", "--quiet", "--python", sys.executable, str(venv))
    uv("export", "--frozen", "--no-dev", "--no-emit-project", "--no-header", "--quiet",
       "-o", str(tmp_path / "requirements.txt"))
    uv("pip", "sync", "--quiet", "--python", str(venv / "bin/python"), "--require-hashes",
       str(tmp_path / "requirements.txt"))
    uv("pip", "install", "--quiet", "--python", str(venv / "bin/python"), "--no-deps", str(REPO))
    names = distributions(venv)
    assert "edgeinfer" in names
    assert not names & {"onnxruntime", "onnxruntime-gpu", "openvino", "psutil", "pillow",
                        "opencv-python-headless"}, names
    # The SDK and the CLI import; nothing of a runtime is loaded for them.
    loaded = run_in(venv, "import sys, edgeinfer.fleet.client, edgeinfer.fleet.aio, edgeinfer.fleet.cli; "
                          "print(sorted({m.split('.')[0] for m in sys.modules} "
                          "& {'onnxruntime', 'openvino', 'psutil'}))")
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    # Installed under its own name only: a user's `agent`, `fleet` or `runtimes` is theirs.
    tops = run_in(venv, "import importlib.util as u; print([n for n in ('edgeinfer', 'agent', "
                        "'fleet', 'runtimes') if u.find_spec(n) is not None])")
    assert tops.stdout.strip() == "['edgeinfer']", tops.stdout + tops.stderr
    fleet_help = subprocess.run([str(venv / "bin/edge-fleet"), "--help"], capture_output=True,
                                text=True, timeout=60, check=False, cwd=tmp_path)
    assert fleet_help.returncode == 0 and "deploy" in fleet_help.stdout, fleet_help.stderr
    # The daemon says what to install, on one line, with the status systemd does not restart on.
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: gw-1\nstate_dir: {tmp_path / 'state'}\n")
    agent = subprocess.run([str(venv / "bin/edge-agent"), "run", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert agent.returncode == 78, agent.stdout + agent.stderr
    lines = agent.stderr.strip().splitlines()
    assert len(lines) == 1 and "edgeinfer[agent]" in lines[0] and "edgeinfer[agent-gpu]" in lines[0]
    assert not (tmp_path / "state").exists()


def test_the_lock_matches_pyproject_and_is_what_this_environment_runs() -> None:
    import importlib.metadata
    import re

    check = subprocess.run([str(UV), "lock", "--check", "--offline"], capture_output=True,
                           text=True, timeout=120, check=False, cwd=REPO)
    assert check.returncode == 0, check.stdout + check.stderr
    text = (REPO / "uv.lock").read_text()
    # Every file the lock can install (a wheel or an sdist, each an inline table with its
    # url) is pinned by its hash.
    files = re.findall(r"\{ url = \"[^\"]+\"[^}]*\}", text)
    assert len(files) > 100
    assert [f for f in files if 'hash = "sha256:' not in f] == []
    locked: dict[str, set[str]] = {}
    for name, version in re.findall(r'^name = "([^"]+)"\nversion = "([^"]+)"$', text, re.MULTILINE):
        locked.setdefault(name, set()).add(version)
    # The suite runs on the locked releases (bootstrap syncs .venv from the lock).
    for name in ("numpy", "onnxruntime", "openvino", "msgspec", "paho-mqtt", "pytest", "rfc8785"):
        assert importlib.metadata.version(name) in locked.get(name, set()), (name, locked.get(name))
    # What the overrides keep out: only the model files of these wheels are used.
    assert not {"torch", "torchaudio", "opencv-python"} & set(locked)
