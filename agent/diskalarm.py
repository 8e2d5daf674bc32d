"""Whether the state disk is full, as the agent's writers have found it: one flag, one
`disk_full` event when it is raised and one `disk_recovered` when it clears, and the
figures for telemetry and Prometheus (agent/metrics.py).

Each writer that can be refused for lack of space (the scheduler's journal commits, the
outbox's deletes of acknowledged rows) raises the alarm under its own name and clears it
when its write goes through again; the disk counts as full while any of them says so.
So a small write that slips through while a large one still fails does not make the
events flap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeinfer.agent.journal import DiskFull
from edgeinfer.agent.metrics import Metrics

log = logging.getLogger(__name__)

Emit = Callable[..., None]  # agent/daemon.py's emit_event(kind, **fields)


class DiskAlarm:
    """Thread-safe."""

    def __init__(self, state_dir: Path, metrics: Metrics, emit: Emit) -> None:
        self._state_dir = state_dir
        self._metrics = metrics
        self._emit = emit
        self._lock = threading.Lock()
        self._full_by: dict[str, str] = {}  # writer -> the cause it saw (SQLITE_FULL, ENOSPC)
        self._since = 0.0

    @property
    def is_full(self) -> bool:
        return bool(self._full_by)

    def full(self, writer: str, exc: DiskFull) -> None:
        with self._lock:
            first = not self._full_by
            known = writer in self._full_by
            self._full_by[writer] = exc.cause
            if first:
                self._since = time.monotonic()
        if known:
            return
        log.error("%s: %s", writer, exc)
        if first:
            self._metrics.state_disk(full=True)
            # Sent directly (agent/daemon.py emit_event): the outbox is on this disk.
            self._emit("disk_full", state_dir=str(self._state_dir), writer=writer,
                       cause=exc.cause, free_bytes=_free(self._state_dir))

    def clear(self, writer: str) -> None:
        with self._lock:
            if self._full_by.pop(writer, None) is None or self._full_by:
                return
            full_s = time.monotonic() - self._since
        self._metrics.state_disk(full=False)
        log.warning("the state disk has room again after %.1fs", full_s)
        self._emit("disk_recovered", state_dir=str(self._state_dir), full_s=round(full_s, 3),
                   free_bytes=_free(self._state_dir))


def _free(path: Path) -> Any:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
