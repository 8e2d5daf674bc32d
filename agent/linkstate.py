"""How the agent's broker link last ended, kept in its state dir for `edge-agent doctor`.

Doctor must not connect with the device's client id to find out: that would take over the
running agent's session. So the agent writes the last thing its session said about the link
(`broker_disconnected`, `session_taken_over`, `broker_refused`: agent/mqtt_session.py) to
`state_dir/broker_link.json`, and doctor reads it. Pure file I/O, no broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

FILE = "broker_link.json"
TAKEN_OVER = "session_taken_over"  # the event's name (agent/mqtt_session.py raises it)
# A takeover older than this is history, not a problem doctor fails on.
RECENT_S = 3600.0


def record(state_dir: Path, event: str, fields: dict[str, Any]) -> None:
    """Write the record atomically (a reader never sees half of it); never raises."""
    doc = {"event": event, "at": time.time(), **fields}
    path = state_dir / FILE
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError, TypeError, ValueError):
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)


def read(state_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((state_dir / FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def doctor_lines(state_dir: Path, device_id: str, now: float | None = None) -> tuple[bool, list[str]]:
    """What doctor says about the running agent's link, and False for a recent takeover."""
    doc = read(state_dir)
    if doc is None:
        return True, []
    now = time.time() if now is None else now
    age = max(0.0, now - float(doc.get("at", 0.0)))
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(doc.get("at", 0.0))))
    reason = doc.get("reason") or "no reason given"
    if doc.get("event") == TAKEN_OVER:
        line = (f"broker session: taken over at {when} ({age:.0f}s ago): another client "
                f"connected with device id {device_id} ({reason})")
        if age <= RECENT_S:
            return False, [line, "  ! two agents share this device id: give each its own "
                                 "device_id (each takes the other's session over in turn)"]
        return True, [line]
    return True, [f"broker session: last link ended at {when} ({age:.0f}s ago): {reason}"]
