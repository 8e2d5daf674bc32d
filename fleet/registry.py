"""The fleet registry: devices, model versions, recent events, last telemetry.

One interface (`Registry`), two backends: SQLite (a file under the controller's state
dir, the default) and PostgreSQL (`postgresql://...`, psycopg 3, for a controller that
outgrows one host). Both run the same SQL except for the DDL of auto-numbered ids and
the parameter style, so they behave the same and are tested with the same tests.

Timestamps are ISO 8601 UTC strings in one fixed format (`2026-01-01T00:00:00.000Z`),
so they compare as text in either database. Documents (reported models, hardware,
telemetry, event bodies) are stored as JSON text.
"""

# S608: queries are assembled only from this module's constant fragments (columns, the
# `last_seen` rule, WHERE clauses over fixed column names); every value is a parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from edgeinfer.contract.topics import DEVICE_ID_RE, NAME_RE

SCHEMA_VERSION = 1
DEFAULT_MAX_EVENTS = 10_000
# Label keys and values end up in selectors (`key=value,key!=value`): no separators.
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")
_SCHEMA_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(Exception):
    """A registry operation was refused (bad input, conflicting model version)."""


class ModelConflict(RegistryError):
    """name:version exists with other bytes: versions are immutable."""


class RegistryUnavailable(RegistryError):
    """The database cannot be reached or written right now; worth retrying."""


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


# -- records --------------------------------------------------------------------------


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


# -- label selectors ------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


@dataclass(frozen=True)
class Selector:
    """A group of devices: `site=berlin,tier!=canary,gpu,!decommissioned` (all must hold)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        parts = []
        for r in self.requirements:
            if r.op == "exists":
                parts.append(r.key)
            elif r.op == "!exists":
                parts.append(f"!{r.key}")
            else:
                parts.append(f"{r.key}{r.op}{r.value}")
        return ",".join(parts)


def parse_selector(text: str) -> Selector:
    """Raises RegistryError naming the part that is not `key`, `!key`, `key=v` or `key!=v`."""
    reqs: list[Requirement] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            op = "!="
        elif "=" in part:
            key, value = part.split("=", 1)
            op = "="
        elif part.startswith("!"):
            key, value, op = part[1:], "", "!exists"
        else:
            key, value, op = part, "", "exists"
        key, value = key.strip(), value.strip()
        check_label(key, value, where=f"selector part {part!r}")
        reqs.append(Requirement(key, op, value))
    return Selector(tuple(reqs))


def check_label(key: str, value: str, where: str = "label") -> None:
    if not LABEL_KEY_RE.match(key):
        raise RegistryError(f"{where}: key {key!r} must match {LABEL_KEY_RE.pattern}")
    if not LABEL_VALUE_RE.match(value):
        raise RegistryError(f"{where}: value {value!r} must match {LABEL_VALUE_RE.pattern}")


# -- the interface --------------------------------------------------------------------


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

    def add_model(self, model: ModelVersion) -> tuple[ModelVersion, bool]: ...

    def model(self, name: str, version: str) -> ModelVersion | None: ...

    def models(self, name: str | None = None) -> list[ModelVersion]: ...

    def events(self, device_id: str | None = None, type_: str | None = None,
               limit: int = 100) -> list[Event]: ...

    def close(self) -> None: ...


# -- the shared SQL implementation ----------------------------------------------------

_TABLES = """
CREATE TABLE IF NOT EXISTS registry_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    online BOOLEAN,
    state TEXT NOT NULL DEFAULT 'unknown',
    last_seen TEXT,
    agent_version TEXT,
    session_id TEXT,
    started_at TEXT,
    revision BIGINT,
    models TEXT NOT NULL DEFAULT '[]',
    last_error TEXT,
    hardware TEXT NOT NULL DEFAULT '{}',
    reported_at TEXT
);
CREATE TABLE IF NOT EXISTS device_labels (
    device_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    task TEXT NOT NULL,
    format TEXT NOT NULL,
    labels_sha256 TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS telemetry (
    device_id TEXT PRIMARY KEY,
    received_at TEXT NOT NULL,
    body TEXT NOT NULL
);
"""

_EVENTS_INDEX = "CREATE INDEX IF NOT EXISTS events_by_device ON events (device_id, id)"

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

    # Helpers ------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql if self._param == "?" else sql.replace("?", self._param)

    def _run(self, fn: Any) -> Any:
        """Run `fn(execute)` in one transaction, translating connection failures."""
        with self._lock:
            try:
                with self._tx() as cur:
                    def execute(sql: str, params: Sequence[Any] = ()) -> list[Any]:
                        cur.execute(self._sql(sql), tuple(params))
                        return list(cur.fetchall()) if cur.description else []
                    return fn(execute)
            except RegistryError:
                raise
            except Exception as exc:
                if self._unavailable(exc):
                    raise RegistryUnavailable(f"registry {self.url}: {exc}") from exc
                raise

    def _create(self) -> None:
        def create(ex: Any) -> None:
            for stmt in (*_TABLES.split(";"), self._events_ddl, _EVENTS_INDEX):
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
        self._run(create)

    # Devices ------------------------------------------------------------------------

    def record_state(self, device_id: str, *, state: str, agent_version: str | None,
                     session_id: str | None, started_at: str | None, seen_at: str | None) -> None:
        _check_device(device_id)
        online = {"online": True, "offline": False}.get(state)
        self._run(lambda ex: ex(
            "INSERT INTO devices (device_id, online, state, agent_version, session_id, "
            "started_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET online = excluded.online, "
            "state = excluded.state, "
            "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
            "session_id = COALESCE(excluded.session_id, devices.session_id), "
            "started_at = COALESCE(excluded.started_at, devices.started_at), "
            f"last_seen = {_LATER_SEEN}",
            [device_id, online, state, agent_version, session_id, started_at, seen_at]))

    def record_reported(self, device_id: str, *, agent_version: str | None,
                        revision: int | None, models: Sequence[Mapping[str, Any]],
                        last_error: str | None, hardware: Mapping[str, Any],
                        reported_at: str | None, seen_at: str | None) -> None:
        _check_device(device_id)
        self._run(lambda ex: ex(
            "INSERT INTO devices (device_id, agent_version, revision, models, last_error, "
            "hardware, reported_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET "
            "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
            "revision = excluded.revision, models = excluded.models, "
            "last_error = excluded.last_error, hardware = excluded.hardware, "
            f"reported_at = excluded.reported_at, last_seen = {_LATER_SEEN}",
            [device_id, agent_version, revision, _dumps(list(models)), last_error,
             _dumps(dict(hardware)), reported_at, seen_at]))

    def _touch(self, ex: Any, device_id: str, seen_at: str) -> None:
        ex("INSERT INTO devices (device_id, last_seen) VALUES (?, ?) "
           f"ON CONFLICT (device_id) DO UPDATE SET last_seen = {_LATER_SEEN}",
           [device_id, seen_at])

    def record_telemetry(self, device_id: str, body: Mapping[str, Any], received_at: str,
                         *, live: bool = True) -> None:
        _check_device(device_id)

        def write(ex: Any) -> None:
            ex("INSERT INTO telemetry (device_id, received_at, body) VALUES (?, ?, ?) "
               "ON CONFLICT (device_id) DO UPDATE SET received_at = excluded.received_at, "
               "body = excluded.body", [device_id, received_at, _dumps(dict(body))])
            if live:
                self._touch(ex, device_id, received_at)
        self._run(write)

    def add_event(self, device_id: str, body: Mapping[str, Any], received_at: str) -> int:
        _check_device(device_id)
        kind = body.get("type")
        ts = normalize_ts(body.get("ts"))

        def write(ex: Any) -> int:
            rows = ex("INSERT INTO events (device_id, type, ts, received_at, body) "
                      "VALUES (?, ?, ?, ?, ?) RETURNING id",
                      [device_id, str(kind) if kind is not None else "unknown", ts,
                       received_at, _dumps(dict(body))])
            new_id = int(rows[0][0])
            # Bounded: only the newest `max_events` are kept (ids only grow).
            ex("DELETE FROM events WHERE id <= ?", [new_id - self.max_events])
            self._touch(ex, device_id, received_at)
            return new_id
        return int(self._run(write))

    def set_labels(self, device_id: str, set_: Mapping[str, str],
                   remove: Iterable[str] = ()) -> dict[str, str]:
        """Set and remove labels of a device (known or not yet seen); returns all its labels."""
        _check_device(device_id)
        removed = list(remove)
        for key, value in set_.items():
            check_label(key, value)
        for key in removed:
            check_label(key, "")

        def write(ex: Any) -> dict[str, str]:
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
        result: dict[str, str] = self._run(write)
        return result

    def _device_rows(self, ex: Any, where: str = "", params: Sequence[Any] = ()) -> list[Device]:
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
        found: list[Device] = self._run(
            lambda ex: self._device_rows(ex, "WHERE device_id = ?", [device_id]))
        return found[0] if found else None

    def devices(self, selector: Selector | None = None) -> list[Device]:
        rows: list[Device] = self._run(self._device_rows)
        if selector is None:
            return rows
        return [d for d in rows if selector.matches(d.labels)]

    def telemetry(self, device_id: str) -> Telemetry | None:
        rows = self._run(lambda ex: ex(
            "SELECT received_at, body FROM telemetry WHERE device_id = ?", [device_id]))
        if not rows:
            return None
        return Telemetry(device_id, str(rows[0][0]), _loads(rows[0][1], {}))

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

        def write(ex: Any) -> tuple[ModelVersion, bool]:
            inserted = ex(
                "INSERT INTO models (name, version, sha256, size, task, format, labels_sha256, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name, version) DO NOTHING RETURNING name",
                [model.name, model.version, model.sha256, model.size, model.task, model.format,
                 model.labels_sha256, created])
            stored = self._model_rows(ex, "WHERE name = ? AND version = ?",
                                      [model.name, model.version])[0]
            return stored, bool(inserted)

        stored, inserted = self._run(write)
        if not stored.same_content(model):
            raise ModelConflict(
                f"model {model.name}:{model.version} already exists with sha256 "
                f"{stored.sha256} ({stored.size} bytes, task {stored.task}); a version names "
                "one set of bytes forever: push a new version")
        return stored, inserted

    def _model_rows(self, ex: Any, where: str = "", params: Sequence[Any] = ()
                    ) -> list[ModelVersion]:
        rows = ex("SELECT name, version, sha256, size, task, format, labels_sha256, created_at "
                  f"FROM models {where} ORDER BY name, created_at, version", params)
        return [ModelVersion(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), str(r[5]),
                             r[6], str(r[7])) for r in rows]

    def model(self, name: str, version: str) -> ModelVersion | None:
        rows: list[ModelVersion] = self._run(lambda ex: self._model_rows(
            ex, "WHERE name = ? AND version = ?", [name, version]))
        return rows[0] if rows else None

    def models(self, name: str | None = None) -> list[ModelVersion]:
        if name is None:
            found: list[ModelVersion] = self._run(self._model_rows)
            return found
        named: list[ModelVersion] = self._run(
            lambda ex: self._model_rows(ex, "WHERE name = ?", [name]))
        return named

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
        rows = self._run(lambda ex: ex(
            f"SELECT id, device_id, type, ts, received_at, body FROM events {where} "
            "ORDER BY id DESC LIMIT ?", [*params, max(1, int(limit))]))
        return [Event(int(r[0]), str(r[1]), str(r[2]), r[3], str(r[4]), _loads(r[5], {}))
                for r in rows]


# -- SQLite ---------------------------------------------------------------------------


class SqliteRegistry(SqlRegistry):
    """A file (WAL mode): the controller and `edge-fleet models push` may share it."""

    _events_ddl = """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        type TEXT NOT NULL,
        ts TEXT,
        received_at TEXT NOT NULL,
        body TEXT NOT NULL
    )"""

    def __init__(self, path: Path | str, max_events: int = DEFAULT_MAX_EVENTS,
                 create: bool = True) -> None:
        super().__init__(max_events)
        self.path = Path(path).expanduser()
        self.url = str(self.path)
        target: Path | str = self.path
        if not create and not self.path.exists():
            # A reader of a registry nobody made yet: an empty one in memory answers as a
            # new file would, and nothing is left on disk (no folder, no file).
            target = ":memory:"
        try:
            if target == self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(target, isolation_level=None, timeout=10.0,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise RegistryUnavailable(f"cannot open registry {self.path}: {exc}") from None
        self._create()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            self._db.rollback()
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def _unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- PostgreSQL -----------------------------------------------------------------------


def split_schema(url: str) -> tuple[str, str | None]:
    """`postgresql://...?schema=fleet` -> (the URL without it, "fleet")."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = [(k, v) for k, v in query if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresRegistry(SqlRegistry):
    """PostgreSQL through psycopg 3; `schema` keeps the tables apart (created if missing)."""

    _events_ddl = """CREATE TABLE IF NOT EXISTS events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id TEXT NOT NULL,
        type TEXT NOT NULL,
        ts TEXT,
        received_at TEXT NOT NULL,
        body TEXT NOT NULL
    )"""
    _param = "%s"

    def __init__(self, url: str, schema: str | None = None,
                 max_events: int = DEFAULT_MAX_EVENTS, connect_timeout_s: int = 5) -> None:
        super().__init__(max_events)
        try:
            import psycopg  # noqa: PLC0415 (optional: the `postgres` extra)
        except ImportError:
            raise RegistryError(
                "a postgresql:// registry needs psycopg 3: pip install 'edgeinfer[postgres]'"
            ) from None
        self._psycopg = psycopg
        base, url_schema = split_schema(url)
        self.schema = schema or url_schema
        if self.schema is not None and not _SCHEMA_NAME_RE.match(self.schema):
            raise RegistryError(f"schema {self.schema!r} must match {_SCHEMA_NAME_RE.pattern}")
        self._conninfo = base
        self._timeout = connect_timeout_s
        self.url = redact(url)
        self._db: Any = None
        with self._lock:
            self._connect()
        self._create()

    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            db = psycopg.connect(self._conninfo, autocommit=True,
                                 connect_timeout=self._timeout)
            if self.schema is not None:
                db.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                db.execute(f'SET search_path TO "{self.schema}"')
        except psycopg.Error as exc:
            raise RegistryUnavailable(f"cannot open registry {self.url}: {exc}") from None
        self._db = db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        if self._db is None or self._db.closed or self._db.broken:
            self._connect()  # e.g. after the server restarted
        with self._db.transaction(), self._db.cursor() as cur:
            yield cur

    def _unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.OperationalError)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()


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
