"""Disk full loses nothing (issue 12, point 1): the probe, with figures.

Runs a real broker and a real `edge-agent` whose `state_dir` is an 8 MB tmpfs, fills that
disk with a filler file, sends a burst of 30 jobs (five of them over the journal's spool
threshold), restarts the agent while the disk is still full and sends 5 more, then deletes
the filler and waits for the agent to catch up by itself. Prints, per phase and at the end:
jobs sent, jobs the agent acknowledged (journaled: the agent acknowledges a job only after
its journal row is committed, so the journal's keys are the acknowledged jobs), jobs
answered, jobs unanswered after space came back, answer codes, events seen.

    python -m bench.probes.disk_full

Needs root (or a user namespace: `unshare -rm`) to mount the tmpfs.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeinfer.agent.journal import SPOOL_MIN_BYTES
from edgeinfer.contract.topics import Topics

DEVICE = "gw-diskfull"
TMPFS_BYTES = 8 * 1024 * 1024
BURST = 30
BIG_IN_BURST = 5  # jobs of the burst whose payload goes to a spool file
AFTER_RESTART = 5
# Left free after the fill: the burst's first jobs are journaled, then the disk is full
# with jobs accepted and their answers still to be written (the field's case).
SLACK = 192 * 1024


def mount_tmpfs(where: Path, size: int = TMPFS_BYTES) -> str | None:
    """Mount a tmpfs of `size` bytes at `where`; None on success, else why not."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount could not run: {exc}"
    if done.returncode != 0:
        return f"mount -t tmpfs failed (rc {done.returncode}; needs root or `unshare -rm`)"
    return None


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10, check=False)


def fill(where: Path, slack: int = 0, name: str = "filler") -> Path:
    """Write a file at `where` until the disk says ENOSPC, then give back `slack` bytes;
    returns its path."""
    path = where / name
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        # The last few bytes too: a tmpfs frees and hands out whole pages.
        for size in (4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
        if slack:
            f.truncate(max(0, f.tell() - slack))
    return path


def job(job_id: str, x: list[float], pad: int = 0) -> bytes:
    body: dict[str, Any] = {"id": job_id, "model_name": "digits",
                            "inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                        "data": x}],
                            "outputs": [{"name": "label"}]}
    if pad:
        body["parameters"] = {"pad": "p" * pad}
    return json.dumps(body).encode()


def journal_keys(state: Path) -> set[str]:
    """Job ids the agent has journaled (read-only: the disk may be full)."""
    db = state / "journal.sqlite3"
    if not db.exists():
        return set()
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            keys = [k for (k,) in conn.execute("SELECT key FROM jobs")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        print(f"  (journal unreadable: {exc.sqlite_errorname})")
        return set()
    return {k.rsplit("|", 1)[-1] for k in keys}


@contextlib.contextmanager
def stack(root: Path) -> Iterator[tuple[Any, Any, Path]]:
    from tests.agentproc import AgentProcess
    from tests.broker import Broker
    from tests.helpers import wait_state

    state = root / "state"
    why = mount_tmpfs(state)
    if why is not None:
        raise SystemExit(f"cannot run: {why}")
    broker = Broker(root / "broker")
    broker.start()
    agent = AgentProcess(root / "agent", broker.url, DEVICE, state_dir=str(state),
                         log={"level": "INFO"})
    agent.start()
    try:
        wait_state(broker.url, "online", DEVICE)
        yield broker, agent, state
    finally:
        agent.stop()
        broker.stop()
        unmount(state)


def codes(answers: list[dict[str, Any]]) -> str:
    c = collections.Counter(a.get("parameters", {}).get("code", "OK") if "error" in a else "OK"
                            for a in answers)
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def main() -> int:
    from bench.models import build_digits
    from tests.helpers import Replies, Watch, deploy, wait_state

    with tempfile.TemporaryDirectory(prefix="probe-diskfull-") as tmp:
        root = Path(tmp)
        digits = build_digits(root / "digits")
        xs = [digits.x_test[i].tolist() for i in range(len(digits.x_test))]
        with stack(root) as (broker, agent, state):
            assert deploy(broker.url, root, "--model", "digits", "--version", "1",
                          "--file", str(digits.path), "--wait", "60", device=DEVICE) == 0
            topics = Topics("edge/v1", DEVICE)
            events = Watch(broker.url, topics.events)
            replies = Replies(broker.url)
            sent: list[str] = []

            def send(job_id: str, pad: int = 0) -> None:
                sent.append(job_id)
                replies.send(topics.jobs, job(job_id, xs[len(sent) % len(xs)], pad),
                             job_id.encode())

            for i in range(3):
                send(f"warm-{i}")
            replies.wait_count(3, 20)
            t0 = time.monotonic()
            filler = fill(state, SLACK)
            print(f"disk filled: {filler.stat().st_size} bytes of filler on an "
                  f"{TMPFS_BYTES // 2**20} MB tmpfs, {SLACK // 1024} KiB left free")

            for i in range(BURST):
                send(f"burst-{i}", SPOOL_MIN_BYTES + 1000 if i % (BURST // BIG_IN_BURST) == 0 else 0)
            time.sleep(5)
            burst_ids = [j for j in sent if j.startswith("burst-")]
            acked = journal_keys(state)
            by = replies.by_correlation()
            print(f"burst while full: sent {len(burst_ids)}, acknowledged by the agent "
                  f"{len(acked & set(burst_ids))}, answered "
                  f"{sum(1 for j in burst_ids if j.encode() in by)}, codes: "
                  f"{codes([a for j in burst_ids for a in by.get(j.encode(), [])])}")

            agent.stop()
            # A clean stop checkpoints the journal and gives some space back: take it, so
            # the agent starts on a full disk.
            refill = fill(state, name="filler2")
            agent.start()
            try:
                wait_state(broker.url, "online", DEVICE, timeout=20)
                up = "online"
            except AssertionError:
                up = "NOT online"
            for i in range(AFTER_RESTART):
                send(f"restart-{i}")
            time.sleep(5)
            restart_ids = [j for j in sent if j.startswith("restart-")]
            acked = journal_keys(state)
            by = replies.by_correlation()
            print(f"restart while full: agent {up}; sent {len(restart_ids)}, acknowledged "
                  f"{len(acked & set(restart_ids))}, answered "
                  f"{sum(1 for j in restart_ids if j.encode() in by)}, codes: "
                  f"{codes([a for j in restart_ids for a in by.get(j.encode(), [])])}")

            filler.unlink()
            refill.unlink()
            print(f"space back after {time.monotonic() - t0:.1f}s; no restart")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                by = replies.by_correlation()
                if all(any("error" not in a for a in by.get(j.encode(), [])) for j in sent):
                    break
                time.sleep(0.2)
            acked = journal_keys(state)
            by = replies.by_correlation()
            test_ids = burst_ids + restart_ids
            ok = [j for j in test_ids if any("error" not in a for a in by.get(j.encode(), []))]
            unanswered = [j for j in test_ids if j.encode() not in by]
            acked_unanswered = [j for j in test_ids if j in acked and j.encode() not in by]
            print("--- after space came back (30 s at most) ---")
            print(f"jobs sent while full:          {len(test_ids)}")
            print(f"acknowledged by the agent:     {len(acked & set(test_ids))}")
            print(f"answered (any answer):         {len(test_ids) - len(unanswered)}")
            print(f"answered with outputs:         {len(ok)}")
            print(f"unanswered:                    {len(unanswered)} {unanswered}")
            print(f"acknowledged but unanswered:   {len(acked_unanswered)} {acked_unanswered}")
            print(f"answer codes (every answer):   "
                  f"{codes([a for j in test_ids for a in by.get(j.encode(), [])])}")
            texts = sorted({a["error"] for j in test_ids for a in by.get(j.encode(), [])
                            if "error" in a})
            for text in texts:
                print(f"  error text: {text}")
            print(f"events seen:                   {dict(collections.Counter(events.types()))}")
            errors = [line.split(" ", 2)[-1][:200] for line in agent.log_text().splitlines()
                      if " ERROR " in line or " WARNING " in line
                      or line.startswith(("sqlite3.", "OSError"))]
            print(f"agent log: {len(errors)} warning/error line(s); distinct (first 10):")
            for line in list(dict.fromkeys(errors))[:10]:
                print(f"  {line}")
            events.close()
            replies.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
