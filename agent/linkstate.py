"""How the agent's broker link last ended, kept in its state dir for `edge-agent doctor`.

Doctor must not connect with the device's client id to find out: that would take over the
running agent's session. So the agent writes the last thing its session said about the link
(`broker_disconnected`, `session_taken_over`, `broker_refused`: agent/mqtt_session/) to
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
TAKEN_OVER = "session_taken_over"  # the event's name (agent/mqtt_session/ raises it)


def record(state_dir: Path, event: str, fields: dict[str, Any]) -> None:
    """Write the record atomically (a reader never sees half of it); never raises.

    The last takeover is carried over into later records (`last_takeover_at`,
    `last_takeover_reason`): twins take each other over in turns, with ordinary link ends
    in between, and doctor must still see the takeover behind them."""
    now = time.time()
    doc: dict[str, Any] = {"event": event, "at": now, **fields}
    before = read(state_dir) or {}
    if event == TAKEN_OVER:
        doc["last_takeover_at"] = now
        doc["last_takeover_reason"] = fields.get("reason")
    elif "last_takeover_at" in before:
        doc["last_takeover_at"] = before["last_takeover_at"]
        doc["last_takeover_reason"] = before.get("last_takeover_reason")
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


def doctor_lines(state_dir: Path, device_id: str, recent_s: float,
                 now: float | None = None) -> tuple[bool, list[str]]:
    """What doctor says about the running agent's link, and False for a recent takeover.

    `recent_s`: how long after a takeover a twin may still come back (1.5 x the longest
    takeover backoff, broker.takeover_backoff_max_s, jitter included); a takeover older
    than that, with none since, was resolved (the twin is gone) and is only mentioned."""
    doc = read(state_dir)
    if doc is None:
        return True, []
    now = time.time() if now is None else now
    lines = []
    if doc.get("event") != TAKEN_OVER:
        lines.append(f"broker session: last link ended at {_when(doc.get('at'), now)}: "
                     f"{doc.get('reason') or 'no reason given'}")
    taken_at = doc.get("last_takeover_at")
    if not isinstance(taken_at, (int, float)):
        return True, lines
    line = (f"broker session: taken over at {_when(taken_at, now)}: another client connected "
            f"with device id {device_id} ({doc.get('last_takeover_reason') or 'no reason given'})")
    if now - taken_at <= recent_s:
        return False, [*lines, line, "  ! two agents share this device id: give each its own "
                                     "device_id (each takes the other's session over in turn)"]
    return True, [*lines, line + "; none since, so the other client is gone"]


def _when(at: object, now: float) -> str:
    t = float(at) if isinstance(at, (int, float)) else 0.0
    return (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
            + f" ({max(0.0, now - t):.0f}s ago)")
