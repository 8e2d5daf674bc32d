"""The processes a bench part starts beside itself (helpers, the broker, the agent): starting
a helper until it says it is ready, stopping one, stopping them all at the end; and what
they cost: their CPU time (`Watched`) and the agent's RSS over time (`Sampler`)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.raw import busy_cpu_s


class Sampler:
    """RSS of the agent every 50 ms, tagged with what was running."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self._tag = "idle"
        self._lock = threading.Lock()
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def tag(self, tag: str) -> None:
        with self._lock:
            self._tag = tag

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                rss = self._proc.memory_info().rss
            except psutil.Error:
                return
            with self._lock:
                self.peaks[self._tag] = max(self.peaks.get(self._tag, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


@dataclass
class Watched:
    """Processes whose CPU time a point reports: the target, the broker, this client; and
    the machine's busy time, so CPU that none of them used (other work on the machine)
    shows up."""

    target: psutil.Process | None
    broker: psutil.Process | None
    client: psutil.Process = field(default_factory=psutil.Process)

    def snapshot(self) -> tuple[float, float, float, float]:
        return _cpu_s(self.target), _cpu_s(self.broker), _cpu_s(self.client), busy_cpu_s()


def start_helper(args: list[str], ready: str, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                                stderr=logf, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if ready not in line:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}; log: {log.read_text()[-2000:]}")
    return proc


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def processes(work: Path) -> Iterator[list[Any]]:
    """Whatever is appended is stopped or closed, in reverse order."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for item in reversed(started):
            with contextlib.suppress(Exception):
                if isinstance(item, subprocess.Popen):
                    stop_process(item)
                elif hasattr(item, "stop"):
                    item.stop()
                else:
                    item.close()
