"""`SqlRegistry`: the registry in SQL that SQLite and PostgreSQL both run.

Both backends (fleet/registry/sqlite.py, fleet/registry/postgres.py) run the same
statements; they differ only in the connection, the parameter style (`?` here, turned
into `%s` for psycopg) and the DDL of the auto-numbered event ids, so they behave the
same and are tested with the same tests. Documents (reported models, hardware,
telemetry, event bodies) are stored as JSON text.

`transaction()` is the public way in for code that keeps its own tables in the same
database (fleet/rollout/store.py): the same connection, lock and error translation as
the registry's own statements.
"""

# S608: queries are assembled only from this module's constant fragments (columns, the
# `last_seen` rule, WHERE clauses over fixed column names); every value is a parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import json
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from edgeinfer.contract.topics import DEVICE_ID_RE, NAME_RE
from edgeinfer.fleet.registry.errors import ModelConflict, RegistryError, RegistryUnavailable
from edgeinfer.fleet.registry.labels import Selector, check_label
from edgeinfer.fleet.registry.records import (
    Device,
    Event,
    ModelVersion,
    Telemetry,
    normalize_ts,
    utc_now,
)
from edgeinfer.fleet.registry.schema import EVENTS_INDEX, SCHEMA_VERSION, TABLES

DEFAULT_MAX_EVENTS = 10_000
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class Execute(Protocol):
    """Runs one statement (`?` marks each parameter) and returns its rows (none: [])."""

    def __call__(self, sql: str, params: Sequence[Any] = (), /) -> list[Any]: ...


# `last_seen` only moves forward: a retained message read again after a restart carries
# its own (older) timestamp and must not make a silent device look fresh.
_LATER_SEEN = ("CASE WHEN excluded.last_seen IS NOT NULL AND (devices.last_seen IS NULL "
               "OR excluded.last_seen > devices.last_seen) "
               "THEN excluded.last_seen ELSE devices.last_seen END")

_DEVICE_COLUMNS = ("device_id, online, state, last_seen, agent_version, session_id, started_at, "
                   "revision, models, last_error, hardware, reported_at")


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str)


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _check_device(device_id: str) -> None:
    if not DEVICE_ID_RE.match(device_id):
        raise RegistryError(f"device id {device_id!r} must match {DEVICE_ID_RE.pattern}")


class SqlRegistry(ABC):
    """The registry over a DB-API connection; subclasses supply connection and dialect.

    One connection, one lock: the controller writes from one thread and the HTTP API
    reads from others; statements are short, so a lock costs less than a pool.
    """

    url: str = ""
    _events_ddl: str = ""
    _param = "?"

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if max_events < 1:
            raise RegistryError("max_events must be at least 1")
        self.max_events = max_events
        self._lock = threading.RLock()

    # Backend hooks ------------------------------------------------------------------

    @abstractmethod
    def _tx(self) -> contextlib.AbstractContextManager[Any]:
        """A cursor inside one transaction: committed on exit, rolled back on error."""

    @abstractmethod
    def _unavailable(self, exc: BaseException) -> bool:
        """Whether `exc` means the database is unreachable (worth a retry)."""

    @abstractmethod
    def close(self) -> None: ...

    # Transactions -------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql if self._param == "?" else sql.replace("?", self._param)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Execute]:
        """One transaction on the registry's database, for the registry and its neighbours.

            with registry.transaction() as execute:
                rows = execute("SELECT id FROM rollouts WHERE status = ?", ["running"])

        Committed when the block ends, rolled back when it raises. A database that cannot
        be reached raises RegistryUnavailable (worth a retry). Write `?` for parameters in
        either dialect, and only SQL that SQLite and PostgreSQL both run. The block holds
        the registry's lock (every other reader and writer waits): keep it short, no
        network I/O inside, and open no transaction within another.
        """
        with self._lock:
            try:
                with self._tx() as cur:
                    def execute(sql: str, params: Sequence[Any] = (), /) -> list[Any]:
                        cur.execute(self._sql(sql), tuple(params))
                        return list(cur.fetchall()) if cur.description else []
                    yield execute
            except RegistryError:
                raise
            except Exception as exc:
                if self._unavailable(exc):
                    raise RegistryUnavailable(f"registry {self.url}: {exc}") from exc
                raise

    def _create(self) -> None:
        with self.transaction() as ex:
            for stmt in (*TABLES.split(";"), self._events_ddl, EVENTS_INDEX):
                if stmt.strip():
                    ex(stmt)
            rows = ex("SELECT value FROM registry_meta WHERE key = 'schema_version'")
            if not rows:
                ex("INSERT INTO registry_meta (key, value) VALUES ('schema_version', ?)",
                   [str(SCHEMA_VERSION)])
            elif int(rows[0][0]) > SCHEMA_VERSION:
                raise RegistryError(
                    f"registry {self.url} has schema version {rows[0][0]}, newer than this "
                    f"edge-fleet understands ({SCHEMA_VERSION}): upgrade edge-fleet")

    # Devices ------------------------------------------------------------------------

    def record_state(self, device_id: str, *, state: str, agent_version: str | None,
                     session_id: str | None, started_at: str | None, seen_at: str | None) -> None:
        _check_device(device_id)
        online = {"online": True, "offline": False}.get(state)
        with self.transaction() as ex:
            ex("INSERT INTO devices (device_id, online, state, agent_version, session_id, "
               "started_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (device_id) DO UPDATE SET online = excluded.online, "
               "state = excluded.state, "
               "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
               "session_id = COALESCE(excluded.session_id, devices.session_id), "
               "started_at = COALESCE(excluded.started_at, devices.started_at), "
               f"last_seen = {_LATER_SEEN}",
               [device_id, online, state, agent_version, session_id, started_at, seen_at])

    def record_reported(self, device_id: str, *, agent_version: str | None,
                        revision: int | None, models: Sequence[Mapping[str, Any]],
                        last_error: str | None, hardware: Mapping[str, Any],
                        reported_at: str | None, seen_at: str | None) -> None:
        _check_device(device_id)
        with self.transaction() as ex:
            ex("INSERT INTO devices (device_id, agent_version, revision, models, last_error, "
               "hardware, reported_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
               "ON CONFLICT (device_id) DO UPDATE SET "
               "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
               "revision = excluded.revision, models = excluded.models, "
               "last_error = excluded.last_error, hardware = excluded.hardware, "
               f"reported_at = excluded.reported_at, last_seen = {_LATER_SEEN}",
               [device_id, agent_version, revision, _dumps(list(models)), last_error,
                _dumps(dict(hardware)), reported_at, seen_at])

    def _touch(self, ex: Execute, device_id: str, seen_at: str) -> None:
        ex("INSERT INTO devices (device_id, last_seen) VALUES (?, ?) "
           f"ON CONFLICT (device_id) DO UPDATE SET last_seen = {_LATER_SEEN}",
           [device_id, seen_at])

    def record_telemetry(self, device_id: str, body: Mapping[str, Any], received_at: str,
                         *, live: bool = True) -> None:
        _check_device(device_id)
        with self.transaction() as ex:
            ex("INSERT INTO telemetry (device_id, received_at, body) VALUES (?, ?, ?) "
               "ON CONFLICT (device_id) DO UPDATE SET received_at = excluded.received_at, "
               "body = excluded.body", [device_id, received_at, _dumps(dict(body))])
            if live:
                self._touch(ex, device_id, received_at)

    def add_event(self, device_id: str, body: Mapping[str, Any], received_at: str) -> int:
        _check_device(device_id)
        kind = body.get("type")
        ts = normalize_ts(body.get("ts"))
        with self.transaction() as ex:
            rows = ex("INSERT INTO events (device_id, type, ts, received_at, body) "
                      "VALUES (?, ?, ?, ?, ?) RETURNING id",
                      [device_id, str(kind) if kind is not None else "unknown", ts,
                       received_at, _dumps(dict(body))])
            new_id = int(rows[0][0])
            # Bounded: only the newest `max_events` are kept (ids only grow).
            ex("DELETE FROM events WHERE id <= ?", [new_id - self.max_events])
            self._touch(ex, device_id, received_at)
        return new_id

    def set_labels(self, device_id: str, set_: Mapping[str, str],
                   remove: Iterable[str] = ()) -> dict[str, str]:
        """Set and remove labels of a device (known or not yet seen); returns all its labels."""
        _check_device(device_id)
        removed = list(remove)
        for key, value in set_.items():
            check_label(key, value)
        for key in removed:
            check_label(key, "")
        with self.transaction() as ex:
            ex("INSERT INTO devices (device_id) VALUES (?) ON CONFLICT (device_id) DO NOTHING",
               [device_id])
            for key in removed:
                ex("DELETE FROM device_labels WHERE device_id = ? AND key = ?", [device_id, key])
            for key, value in set_.items():
                ex("INSERT INTO device_labels (device_id, key, value) VALUES (?, ?, ?) "
                   "ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value",
                   [device_id, key, value])
            rows = ex("SELECT key, value FROM device_labels WHERE device_id = ? ORDER BY key",
                      [device_id])
        return {str(k): str(v) for k, v in rows}

    def _device_rows(self, ex: Execute, where: str = "", params: Sequence[Any] = ()
                     ) -> list[Device]:
        rows = ex(f"SELECT {_DEVICE_COLUMNS} FROM devices {where} ORDER BY device_id", params)
        label_rows = ex(f"SELECT device_id, key, value FROM device_labels {where} "
                        "ORDER BY device_id, key", params)
        labels: dict[str, dict[str, str]] = {}
        for dev, key, value in label_rows:
            labels.setdefault(str(dev), {})[str(key)] = str(value)
        return [
            Device(
                device_id=str(r[0]), online=None if r[1] is None else bool(r[1]),
                state=str(r[2]), last_seen=r[3], agent_version=r[4], session_id=r[5],
                started_at=r[6], revision=None if r[7] is None else int(r[7]),
                models=_loads(r[8], []), last_error=r[9], hardware=_loads(r[10], {}),
                reported_at=r[11], labels=labels.get(str(r[0]), {}),
            )
            for r in rows
        ]

    def device(self, device_id: str) -> Device | None:
        with self.transaction() as ex:
            found = self._device_rows(ex, "WHERE device_id = ?", [device_id])
        return found[0] if found else None

    def devices(self, selector: Selector | None = None) -> list[Device]:
        with self.transaction() as ex:
            rows = self._device_rows(ex)
        if selector is None:
            return rows
        return [d for d in rows if selector.matches(d.labels)]

    def telemetry(self, device_id: str) -> Telemetry | None:
        with self.transaction() as ex:
            rows = ex("SELECT received_at, body FROM telemetry WHERE device_id = ?", [device_id])
        if not rows:
            return None
        return Telemetry(device_id, str(rows[0][0]), _loads(rows[0][1], {}))

    def telemetry_by_device(self, device_ids: Iterable[str]) -> dict[str, Telemetry]:
        """The last telemetry of each of these devices (those without any are left out).

        One query for the whole table, filtered here: a page of devices costs one round
        trip, not one per device.
        """
        wanted = set(device_ids)
        with self.transaction() as ex:
            rows = ex("SELECT device_id, received_at, body FROM telemetry")
        return {str(dev): Telemetry(str(dev), str(received_at), _loads(body, {}))
                for dev, received_at, body in rows if str(dev) in wanted}

    # Models -------------------------------------------------------------------------

    def add_model(self, model: ModelVersion) -> tuple[ModelVersion, bool]:
        """Record a model version; returns (the stored record, whether it is new).

        The same name:version with the same content is a no-op; with other content it
        raises ModelConflict (a version names one set of bytes, forever).
        """
        for what, value in (("name", model.name), ("version", model.version),
                            ("task", model.task), ("format", model.format)):
            if not NAME_RE.match(value):
                raise RegistryError(f"model {what} {value!r} must match {NAME_RE.pattern}")
        for sha in (model.sha256, model.labels_sha256):
            if sha is not None and not _SHA_RE.match(sha):
                raise RegistryError(f"not a sha256 hex digest: {sha!r}")
        if model.size < 0:
            raise RegistryError("model size must not be negative")
        created = model.created_at or utc_now()
        with self.transaction() as ex:
            inserted = ex(
                "INSERT INTO models (name, version, sha256, size, task, format, labels_sha256, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name, version) DO NOTHING RETURNING name",
                [model.name, model.version, model.sha256, model.size, model.task, model.format,
                 model.labels_sha256, created])
            stored = self._model_rows(ex, "WHERE name = ? AND version = ?",
                                      [model.name, model.version])[0]
        if not stored.same_content(model):
            raise ModelConflict(
                f"model {model.name}:{model.version} already exists with sha256 "
                f"{stored.sha256} ({stored.size} bytes, task {stored.task}); a version names "
                "one set of bytes forever: push a new version")
        return stored, bool(inserted)

    def _model_rows(self, ex: Execute, where: str = "", params: Sequence[Any] = ()
                    ) -> list[ModelVersion]:
        rows = ex("SELECT name, version, sha256, size, task, format, labels_sha256, created_at "
                  f"FROM models {where} ORDER BY name, created_at, version", params)
        return [ModelVersion(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), str(r[5]),
                             r[6], str(r[7])) for r in rows]

    def model(self, name: str, version: str) -> ModelVersion | None:
        with self.transaction() as ex:
            rows = self._model_rows(ex, "WHERE name = ? AND version = ?", [name, version])
        return rows[0] if rows else None

    def models(self, name: str | None = None) -> list[ModelVersion]:
        with self.transaction() as ex:
            if name is None:
                return self._model_rows(ex)
            return self._model_rows(ex, "WHERE name = ?", [name])

    # Events -------------------------------------------------------------------------

    def events(self, device_id: str | None = None, type_: str | None = None,
               limit: int = 100) -> list[Event]:
        """Newest first."""
        clauses, params = [], []
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        if type_ is not None:
            clauses.append("type = ?")
            params.append(type_)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.transaction() as ex:
            rows = ex(f"SELECT id, device_id, type, ts, received_at, body FROM events {where} "
                      "ORDER BY id DESC LIMIT ?", [*params, max(1, int(limit))])
        return [Event(int(r[0]), str(r[1]), str(r[2]), r[3], str(r[4]), _loads(r[5], {}))
                for r in rows]
