"""Reading what agents publish: the retained `reported` and `state` documents.

Agents are written and upgraded separately, so every reader here tolerates missing
keys and wrong types instead of failing on them.
"""

from __future__ import annotations

import json
from typing import Any


def parse_json_object(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object, or None when it is anything else."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def device_state(payload: bytes) -> str:
    """`online`/`offline` from a `state` payload; a bare word (a hand-made will) works too."""
    doc = parse_json_object(payload)
    if doc is not None:
        return str(doc.get("state") or "unknown")
    return payload.decode("utf-8", "replace").strip() or "unknown"


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def applied_revision(reported: dict[str, Any]) -> int | None:
    return int_or_none(reported.get("revision"))


def models_of(reported: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in reported.get("models") or [] if isinstance(m, dict)]


def find_model(reported: dict[str, Any], name: str, version: str | None = None
               ) -> dict[str, Any] | None:
    """The entry of `name` (and `version`, when given) in a `reported` document."""
    for m in models_of(reported):
        if m.get("name") == name and (version is None or m.get("version") == version):
            return m
    return None


def attempts_text(entry: dict[str, Any]) -> str:
    """One line per runtime the agent tried for a model, for an operator to read."""
    lines = []
    for a in entry.get("attempts") or []:
        if isinstance(a, dict):
            verdict = "ok" if a.get("ok") else f"failed: {a.get('reason')}"
            lines.append(f"  tried {a.get('runtime')}/{a.get('device')}: {verdict}")
    return "\n".join(lines)
