"""Where the agent's time goes: CPU time per thread (psutil) named by py-spy, and a py-spy
sample of every thread's stack (idle ones included, so lock waits show)."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from `py-spy dump` (empty without py-spy)."""
    exe = py_spy()
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r'Thread (\d+) \(\w+\): "([^"]+)"', out)}


def thread_cpu(pid: int) -> dict[int, float]:
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def per_thread_ms(before: dict[int, float], after: dict[int, float], names: dict[int, str],
                  jobs: int) -> dict[str, float]:
    """CPU ms per job by thread name; threads without a Python name (the runtimes' own
    pools, sqlite has none) are summed as 'native'."""
    out: dict[str, float] = {}
    for tid, t in after.items():
        name = names.get(tid, "native (runtime threads)")
        out[name] = out.get(name, 0.0) + (t - before.get(tid, 0.0)) * 1000 / max(jobs, 1)
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.0005}


def record(pid: int, seconds: float, raw_out: Path) -> str | None:
    """`py-spy record --idle --threads` for `seconds` into `raw_out` (collapsed stacks);
    returns why not when it could not run."""
    exe = py_spy()
    if exe is None:
        return "py-spy not found"
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
           "--rate", "100", "--idle", "--threads", "--format", "raw", "--output", str(raw_out)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"py-spy failed: {exc}"
    if res.returncode != 0 or not raw_out.exists():
        return f"py-spy failed: {(res.stderr or res.stdout).strip()[-300:]}"
    return None


_IDLE = ("Condition.wait", "Event.wait", "Queue.get", "_worker (concurrent", "select")


def summarize(raw: Path, top: int = 6) -> dict[str, list[str]]:
    """Per thread: its share of samples by (innermost project frame > leaf frame)."""
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].rsplit(":", 1)[-1].strip().strip('"') if ":" in frames[0] else frames[0]
        ours = [f for f in frames if "agent/" in f or "runtimes/" in f]
        leaf = frames[-1]
        where = ours[-1].split(" (")[0] if ours else "?"
        per[thread][f"{where} > {leaf}"] += int(count)
    out: dict[str, list[str]] = {}
    for thread, counter in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counter.values())
        if all(any(i in k for i in _IDLE) for k in counter):
            continue  # a thread that only ever waited
        out[thread] = [f"{n / total * 100:5.1f}% {k}" for k, n in counter.most_common(top)]
    return out


def profile_point(pid: int, seconds: float, out_dir: Path, tag: str) -> dict[str, Any]:
    """Sample the agent for `seconds`; keep the raw stacks next to the results."""
    raw = out_dir / f"profile-{tag}.txt"
    why = record(pid, seconds, raw)
    if why is not None:
        return {"error": why}
    return {"raw_stacks": raw.name, "threads": summarize(raw)}
