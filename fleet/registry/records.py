"""The registry's records (devices, model versions, events, telemetry) and its timestamps.

Timestamps are ISO 8601 UTC strings in one fixed format (`2026-01-01T00:00:00.000Z`),
so they compare as text in either database.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


def utc_now() -> str:
    return format_ts(datetime.now(UTC))


def format_ts(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def normalize_ts(value: Any) -> str | None:
    """An RFC 3339 timestamp from a device in the registry's format, or None."""
    if not isinstance(value, str):
        return None
    try:
        return format_ts(datetime.fromisoformat(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class Device:
    device_id: str
    online: bool | None = None  # None: never heard its state
    state: str = "unknown"
    last_seen: str | None = None
    agent_version: str | None = None
    session_id: str | None = None
    started_at: str | None = None
    revision: int | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    reported_at: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    sha256: str
    size: int
    task: str = "tensor"
    format: str = "onnx"
    labels_sha256: str | None = None  # a class-labels file, stored as an artifact too
    created_at: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def same_content(self, other: ModelVersion) -> bool:
        return (self.sha256, self.size, self.task, self.format, self.labels_sha256) == (
            other.sha256, other.size, other.task, other.format, other.labels_sha256)


@dataclass(frozen=True)
class Event:
    id: int
    device_id: str
    type: str
    ts: str | None  # the device's clock
    received_at: str  # the controller's clock
    body: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Telemetry:
    device_id: str
    received_at: str
    body: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)
