"""The journal's spool: large job payloads as files of their own, beside the database.

Payloads of SPOOL_MIN_BYTES or more are written to a file of their own
(<database file name>.spool/<uuid>) instead of into the database: a 600 KB image as a blob
is written to the WAL, copied again by every checkpoint, and its 150 overflow pages freed
page by page once the job is done; as a file it is one write and one unlink. A file whose
row never committed, or whose job is done but whose unlink did not happen, is removed at
the next start (`remove_all_but`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path

from edgeinfer.agent.store import fsync_dir

SPOOL_DIR = "spool"
SPOOL_MIN_BYTES = 64 * 1024


class Spool:
    """The spool folder of the database at `database`; `full`: fsync each file and the
    folder (synchronous=FULL), so a spooled payload survives power loss as its row does."""

    def __init__(self, database: Path, full: bool) -> None:
        self.path = database.with_name(database.name + "." + SPOOL_DIR)
        self.path.mkdir(exist_ok=True)
        self._full = full

    def write(self, payload: bytes) -> str:
        """Write `payload` to a new file; returns its name. Raises OSError (ENOSPC among
        them) with nothing left behind."""
        name = uuid.uuid4().hex
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            if self._full:
                os.fsync(fd)
        except BaseException:
            # A part written (the disk filled up) would hold its space until the next start.
            os.close(fd)
            self.unlink([name])
            raise
        os.close(fd)
        return name

    def sync(self) -> None:
        """After new files, before their rows commit: the folder's entries too (FULL only)."""
        if self._full:
            fsync_dir(self.path)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def unlink(self, names: Sequence[str]) -> None:
        for name in names:
            # One left behind is removed at the next start.
            with contextlib.suppress(OSError):
                os.unlink(self.path / name)

    def remove_all_but(self, wanted: Collection[str]) -> None:
        """Remove every file not named in `wanted` (the queued jobs' files)."""
        for entry in self.path.iterdir():
            if entry.name not in wanted:
                entry.unlink(missing_ok=True)
