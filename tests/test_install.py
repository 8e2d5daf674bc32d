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
            "--broker", "mqtts://broker.example:8883", "--password-file", str(password))
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
    assert doc["device_id"] == "gw-7" and doc["broker"]["url"] == "mqtts://broker.example:8883"

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
