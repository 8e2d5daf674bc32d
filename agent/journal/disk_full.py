"""A full state disk, told apart from other write errors by error code: `DiskFull`, which
the journal raises and its callers wait out, and `disk_full_cause`, which names the cause."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

# SQLite's I/O errors that mean a full disk when the disk has no room left (SQLite reports
# ENOSPC as SQLITE_FULL on most writes, but as one of these where it grows or maps a file).
_IOERR_WRITES = frozenset({sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_SHMSIZE,
                           sqlite3.SQLITE_IOERR_TRUNCATE, sqlite3.SQLITE_IOERR_FSYNC})


class DiskFull(Exception):
    """A write to the state disk failed for lack of space (the journal's database, its
    WAL, or a spool file). Nothing of the failed write is recorded: the caller keeps what
    it meant to write and tries again later. `cause` is the error's name (SQLITE_FULL,
    ENOSPC, ...), never SQLite's or the OS's text."""

    def __init__(self, state_dir: Path, cause: str) -> None:
        super().__init__(f"the state disk is full (state_dir {state_dir}; {cause})")
        self.state_dir = state_dir
        self.cause = cause


def disk_full_cause(exc: BaseException, where: Path) -> str | None:
    """The name of `exc` when it says the disk under `where` is full, else None. By error
    code, never by message: SQLITE_FULL, ENOSPC or EDQUOT, or one of SQLite's write
    I/O errors while the disk has no room left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errno.errorcode[exc.errno]
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)  # absent on errors sqlite3 makes itself
    if code is None:
        return None
    name = str(getattr(exc, "sqlite_errorname", code))
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return name
    if code in _IOERR_WRITES:
        with contextlib.suppress(OSError):
            if os.statvfs(where).f_bavail == 0:
                return name
    return None
