"""`applied.json`: what this agent serves, written after each reconcile and read at start,
so that a restarted agent serves it again from its store before the broker answers.

Written by one atomic rename (agent/store.py's atomic_write): a process killed at any
moment leaves the old file or the new one, and what a killed write left behind is
removed when the file is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from edgeinfer.agent.store import atomic_write, remove_stale_temps
from edgeinfer.contract.manifest import ModelSpec

log = logging.getLogger(__name__)

APPLIED_FILE = "applied.json"


class Applied(msgspec.Struct, forbid_unknown_fields=True):
    """What this agent serves, as written to disk after each reconcile."""

    revision: int | None
    models: list[ModelSpec]
    # Published.digest of the applied revision's manifest (None in files written before
    # it was kept): the same revision with other content is then told apart.
    digest: str | None = None
    # The applied revision's manifest said `"rollback": true` (in `reported`).
    rollback: bool = False


class AppliedUnreadable(Exception):
    """The file is there but cannot be read as an `Applied`; the message says which and why."""


class AppliedFile:
    """`applied.json` in the agent's state folder."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path / APPLIED_FILE

    def write(self, serving: Iterable[ModelSpec], revision: int | None, digest: str | None,
              rollback: bool, before_replace: Callable[[], None] | None = None) -> None:
        """Replace the file at once; `before_replace` runs between the write and the rename
        (a crash point in tests)."""
        applied = Applied(revision=revision, models=list(serving), digest=digest,
                          rollback=rollback)
        atomic_write(self.path, msgspec.json.encode(applied), before_replace)

    def read(self) -> Applied | None:
        """What was applied before; None when nothing was. Raises AppliedUnreadable."""
        stale = remove_stale_temps(self.path)
        if stale:
            log.info("removed %d unfinished write(s) of %s", stale, self.path.name)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(raw, type=Applied)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AppliedUnreadable(f"{self.path} unreadable ({exc})") from None
