"""Reading what agents publish: `state`, `reported`, `telemetry` and `events`.

Agents are written and upgraded separately, so every reader here tolerates missing keys,
extra keys and wrong types instead of failing on them. The typed readers (`read_state`,
`read_reported`, `read_telemetry`, `read_event`) decode into the contract's Structs
(edgeinfer.contract.documents, edgeinfer.contract.telemetry) leniently: a field of the
wrong type is dropped, not the document.

The dict helpers below them serve what keeps a document's parts as the agent sent them
(the registry stores each model entry as it came, keys unknown to this version included)
and the callers not yet moved to the Structs.
"""

from __future__ import annotations

import json
from typing import Any

from edgeinfer.contract.documents import (
    ModelEntry,
    read_event,
    read_reported,
    read_state,
    state_word,
)
from edgeinfer.contract.telemetry import read_telemetry

__all__ = [
    "attempts_text",
    "device_state",
    "int_or_none",
    "models_of",
    "parse_json_object",
    "read_event",
    "read_reported",
    "read_state",
    "read_telemetry",
]


def device_state(payload: bytes) -> str:
    """`online`/`offline` from a `state` payload; a bare word (a hand-made will) works too."""
    return state_word(payload)


def attempts_text(entry: ModelEntry) -> str:
    """One line per runtime the agent tried for a model, for an operator to read."""
    lines = []
    for a in entry.attempts:
        verdict = "ok" if a.ok else f"failed: {a.reason}"
        lines.append(f"  tried {a.runtime}/{a.device}: {verdict}")
    return "\n".join(lines)


# -- untyped: the parts the controller stores as the agent sent them -------------------


def parse_json_object(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object, or None when it is anything else."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def models_of(reported: dict[str, Any]) -> list[dict[str, Any]]:
    """`reported.models` entries as sent (those that are JSON objects)."""
    return [m for m in reported.get("models") or [] if isinstance(m, dict)]
