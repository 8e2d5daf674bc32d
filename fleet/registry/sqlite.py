"""The registry on SQLite: one file under the controller's state dir (the default)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeinfer.fleet.registry.errors import RegistryUnavailable
from edgeinfer.fleet.registry.sql import DEFAULT_MAX_EVENTS, SqlRegistry


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
