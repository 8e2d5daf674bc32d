"""The fleet registry: devices, model versions, recent events, last telemetry.

One interface (`Registry`), two backends: SQLite (a file under the controller's state
dir, the default) and PostgreSQL (`postgresql://...`, psycopg 3, for a controller that
outgrows one host). `open_registry` picks one from the target. Both run the same SQL
(fleet/registry/sql.py); code that keeps its own tables in the same database, like the
rollout store, goes through `SqlRegistry.transaction()`.

    errors.py     RegistryError and its kinds
    records.py    Device, ModelVersion, Event, Telemetry; the timestamp format
    labels.py     device labels and the selectors over them
    interface.py  Registry, the interface
    schema.py     the tables and the schema version
    sql.py        SqlRegistry, the SQL both databases run, and its transactions
    sqlite.py     SqliteRegistry
    postgres.py   PostgresRegistry (and its URL's `?schema=`)
"""

from __future__ import annotations

from pathlib import Path

from edgeinfer.fleet.registry.errors import ModelConflict, RegistryError, RegistryUnavailable
from edgeinfer.fleet.registry.interface import Registry
from edgeinfer.fleet.registry.labels import (
    LABEL_KEY_RE,
    LABEL_VALUE_RE,
    Requirement,
    Selector,
    check_label,
    parse_selector,
)
from edgeinfer.fleet.registry.postgres import PostgresRegistry, redact, split_schema
from edgeinfer.fleet.registry.records import (
    Device,
    Event,
    ModelVersion,
    Telemetry,
    format_ts,
    normalize_ts,
    utc_now,
)
from edgeinfer.fleet.registry.schema import SCHEMA_VERSION
from edgeinfer.fleet.registry.sql import DEFAULT_MAX_EVENTS, Execute, SqlRegistry
from edgeinfer.fleet.registry.sqlite import SqliteRegistry

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "LABEL_KEY_RE",
    "LABEL_VALUE_RE",
    "SCHEMA_VERSION",
    "Device",
    "Event",
    "Execute",
    "ModelConflict",
    "ModelVersion",
    "PostgresRegistry",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "Requirement",
    "Selector",
    "SqlRegistry",
    "SqliteRegistry",
    "Telemetry",
    "check_label",
    "format_ts",
    "is_postgres_url",
    "normalize_ts",
    "open_registry",
    "parse_selector",
    "redact",
    "split_schema",
    "utc_now",
]


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def open_registry(target: str | Path, max_events: int = DEFAULT_MAX_EVENTS,
                  create: bool = True) -> SqlRegistry:
    """A `postgresql://` URL (`?schema=NAME` optional), else a SQLite file path.

    `create=False` is for commands that only read: a SQLite file that does not exist yet
    reads as an empty registry instead of being made.
    """
    text = str(target)
    if is_postgres_url(text):
        return PostgresRegistry(text, max_events=max_events)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite://"):]
    return SqliteRegistry(text, max_events=max_events, create=create)
