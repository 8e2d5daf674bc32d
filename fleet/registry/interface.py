"""`Registry`: what the controller, the HTTP API and the CLI need from storage.

`SqlRegistry` (fleet/registry/sql.py) is the one implementation, on SQLite or PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from edgeinfer.fleet.registry.labels import Selector
from edgeinfer.fleet.registry.records import Device, Event, ModelVersion, Telemetry


class Registry(Protocol):
    """What the controller, the HTTP API and the CLI need from storage."""

    url: str  # where it lives, without secrets

    def record_state(self, device_id: str, *, state: str, agent_version: str | None,
                     session_id: str | None, started_at: str | None, seen_at: str | None) -> None: ...

    def record_reported(self, device_id: str, *, agent_version: str | None,
                        revision: int | None, models: Sequence[Mapping[str, Any]],
                        last_error: str | None, hardware: Mapping[str, Any],
                        reported_at: str | None, seen_at: str | None) -> None: ...

    def record_telemetry(self, device_id: str, body: Mapping[str, Any], received_at: str,
                         *, live: bool = True) -> None: ...

    def add_event(self, device_id: str, body: Mapping[str, Any], received_at: str) -> int: ...

    def set_labels(self, device_id: str, set_: Mapping[str, str],
                   remove: Iterable[str] = ()) -> dict[str, str]: ...

    def device(self, device_id: str) -> Device | None: ...

    def devices(self, selector: Selector | None = None) -> list[Device]: ...

    def telemetry(self, device_id: str) -> Telemetry | None: ...

    def telemetry_by_device(self, device_ids: Iterable[str]) -> dict[str, Telemetry]: ...

    def add_model(self, model: ModelVersion) -> tuple[ModelVersion, bool]: ...

    def model(self, name: str, version: str) -> ModelVersion | None: ...

    def models(self, name: str | None = None) -> list[ModelVersion]: ...

    def events(self, device_id: str | None = None, type_: str | None = None,
               limit: int = 100) -> list[Event]: ...

    def close(self) -> None: ...
