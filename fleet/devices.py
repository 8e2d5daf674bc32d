"""The fleet as its retained messages describe it: one row per device.

Built from `state` (online/offline), `reported` (what the agent serves) and `desired`
(what it was asked to serve), so it works without any controller running.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeinfer.contract.topics import device_of, device_wildcard
from edgeinfer.fleet.mqtt import Connection
from edgeinfer.fleet.reports import (
    device_state,
    int_or_none,
    models_of,
    parse_json_object,
    read_reported,
    read_state,
)

_LEAVES = ("state", "reported", "desired")
_ERROR_WIDTH = 60


@dataclass
class DeviceRow:
    device: str
    state: str = "unknown"
    agent_version: str | None = None
    revision: int | None = None  # applied, from `reported`
    desired_revision: int | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    updated_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def topic_filters(prefix: str) -> list[str]:
    return [device_wildcard(prefix, leaf) for leaf in _LEAVES]


def rows_from_retained(retained: Mapping[str, bytes], prefix: str) -> list[DeviceRow]:
    """Rows sorted by device id; payloads that are not JSON objects are tolerated."""
    rows: dict[str, DeviceRow] = {}
    for topic, payload in retained.items():
        device = device_of(prefix, topic)
        leaf = topic.rsplit("/", 1)[-1]
        if device is None or leaf not in _LEAVES or topic.count("/") != prefix.count("/") + 3:
            continue
        row = rows.setdefault(device, DeviceRow(device))
        if leaf == "state":
            row.state = device_state(payload)
            state = read_state(payload)
            if state is not None and state.agent_version:
                row.agent_version = state.agent_version
        elif leaf == "reported" and (reported := read_reported(payload)) is not None:
            row.revision = reported.revision
            row.models = models_of(parse_json_object(payload) or {})  # as the agent sent them
            row.last_error = reported.last_error or None
            row.updated_at = reported.updated_at
            row.agent_version = row.agent_version or reported.agent_version
        elif leaf == "desired" and (doc := parse_json_object(payload)) is not None:
            row.desired_revision = int_or_none(doc.get("revision"))
    return [rows[d] for d in sorted(rows)]


def read_devices(conn: Connection, prefix: str, timeout_s: float = 3.0) -> list[DeviceRow]:
    retained = conn.read_retained(topic_filters(prefix), timeout_s=timeout_s)
    return rows_from_retained(retained, prefix)


def model_label(m: Mapping[str, Any]) -> str:
    """`name:version@runtime/device[state]`; the runtime part only once one is chosen."""
    label = f"{m.get('name')}:{m.get('version')}"
    if m.get("runtime"):
        label += f"@{m.get('runtime')}/{m.get('device') or '?'}"
    return f"{label}[{m.get('state') or '?'}]"


def revision_label(row: DeviceRow) -> str:
    applied = "-" if row.revision is None else str(row.revision)
    if row.desired_revision is not None and row.desired_revision != row.revision:
        return f"{applied} (desired {row.desired_revision})"
    return applied


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per device, whatever the error held
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[DeviceRow]) -> str:
    header = ("DEVICE", "STATE", "REVISION", "MODELS", "LAST ERROR")
    lines = [header] + [
        (
            r.device,
            r.state,
            revision_label(r),
            ", ".join(model_label(m) for m in r.models) or "-",
            _clip(r.last_error, _ERROR_WIDTH) if r.last_error else "-",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(w) for cell, w in zip(line, widths, strict=False)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)
