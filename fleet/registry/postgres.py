"""The registry on PostgreSQL (`postgresql://...`, psycopg 3), for a controller that
outgrows one host; `?schema=NAME` in the URL keeps its tables apart."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from edgeinfer.fleet.registry.errors import RegistryError, RegistryUnavailable
from edgeinfer.fleet.registry.sql import DEFAULT_MAX_EVENTS, SqlRegistry

# The schema's name is put into DDL as an identifier (no parameter can stand there).
_SCHEMA_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


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
