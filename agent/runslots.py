"""Which jobs are running right now, in a file that outlives a killed process.

A job that kills the agent (a runtime crash, the OOM killer, a watchdog restart) must not
be run forever: the journal counts how often each unanswered job was running when the
agent stopped. Writing that count before every run would cost a disk write per job on the
workers' hot path, so instead each running thread owns a slot of a memory-mapped file and
writes there the tags of the jobs it is about to run: plain memory writes, no system call,
the GIL never released. The kernel keeps the pages of a killed process, so after a restart
the slots still say what was running; `Journal` adds one attempt to each such job and
clears the file. (A power cut loses them, as it loses the last commits at
synchronous=NORMAL: a poison job then gets one more try.)

Layout: SLOTS slots of SLOT_BYTES, each a little-endian u32 count then `count` tags of
TAG_BYTES. A slot's tags are written before its count, so a count never covers a tag
half-written.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

TAG_BYTES = 24
SLOT_TAGS = 255  # jobs one thread runs at once (a batch); more go through `overflow`
SLOT_BYTES = 4 + SLOT_TAGS * TAG_BYTES + 4  # padded to a multiple of 8
SLOTS = 128  # threads that run jobs; more go through `overflow`
_COUNT = struct.Struct("<I")


def run_tag(key: str, received_wall: float) -> bytes:
    """One admission of a job. The admission time is part of it: a client may use a job id
    again once its answer has been pruned, and that new job must not inherit the old runs."""
    raw = f"{key}\0{received_wall!r}".encode()
    return hashlib.blake2b(raw, digest_size=TAG_BYTES // 2).hexdigest().encode()


def read_running(path: Path) -> list[bytes]:
    """The tags the file holds (each slot's counted tags); [] when there is no file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    tags: list[bytes] = []
    for base in range(0, len(data) - SLOT_BYTES + 1, SLOT_BYTES):
        (count,) = _COUNT.unpack_from(data, base)
        count = min(count, SLOT_TAGS)
        start = base + 4
        tags.extend(data[start + i * TAG_BYTES: start + (i + 1) * TAG_BYTES] for i in range(count))
    return tags


class RunSlots:
    """The mapped file, one slot per thread that runs jobs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, SLOTS * SLOT_BYTES)
            self._mm = mmap.mmap(fd, SLOTS * SLOT_BYTES)
        finally:
            os.close(fd)
        self._mm[:] = bytes(SLOTS * SLOT_BYTES)  # the caller has read what it held
        self._lock = threading.Lock()
        self._next = 0
        self._local = threading.local()

    def _slot(self) -> int | None:
        slot: int | None = getattr(self._local, "slot", -1)
        if slot == -1:
            with self._lock:
                slot = self._next if self._next < SLOTS else None
                self._next += 1
            self._local.slot = slot
        return slot

    def enter(self, tags: Sequence[bytes]) -> list[bytes]:
        """Mark `tags` as running on this thread; returns those that did not fit (the
        caller counts them some other way)."""
        slot = self._slot()
        if slot is None:
            return list(tags)
        fits, rest = tags[:SLOT_TAGS], list(tags[SLOT_TAGS:])
        base = slot * SLOT_BYTES
        self._mm[base + 4: base + 4 + len(fits) * TAG_BYTES] = b"".join(fits)
        self._mm[base: base + 4] = _COUNT.pack(len(fits))
        return rest

    def leave(self) -> None:
        """This thread's jobs are done (answered, or failed without killing us)."""
        slot = getattr(self._local, "slot", None)
        if slot is not None and slot >= 0:
            base = slot * SLOT_BYTES
            self._mm[base: base + 4] = _COUNT.pack(0)

    def close(self) -> None:
        self._mm.close()
