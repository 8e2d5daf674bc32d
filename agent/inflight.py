"""The ledger of jobs taken and not yet answered: counts, repeats, cancel switches, runs.

A job is counted from the commit that journals it (or its recovery from the journal
after a restart) to the commit that records its answer; the intake refuses new jobs
past jobs.queue_size or jobs.max_queued_bytes of them. While a job is unanswered, a
repeat of it from another correlation (a client's retry as a new request) waits here for
its answer. A running job of a cancellable pipeline has a cancel switch here, found by
its key; and each thread running a job says since when, for the watchdog's
`longest_job`. One lock guards it all; nothing is called while it is held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued = 0  # journaled, not yet answered
        self._queued_bytes = 0  # their payloads
        # The correlation each unanswered job first came with, and the repeats of it from
        # other correlations, answered from the stored answer once it is recorded.
        self._first_correlation: dict[str, bytes | None] = {}
        self._repeats: dict[str, list[bytes | None]] = {}
        self._running: dict[str, threading.Event] = {}  # job key -> its cancel switch
        self._busy_since: dict[str, float] = {}  # thread -> when its running job started

    # --- counts --------------------------------------------------------------------------

    def depth(self) -> int:
        with self._lock:
            return self._queued

    def taken(self) -> tuple[int, int]:
        """Jobs and payload bytes counted now."""
        with self._lock:
            return self._queued, self._queued_bytes

    def count_in(self, jobs: int, size: int) -> None:
        with self._lock:
            self._queued += jobs
            self._queued_bytes += size

    def count_out(self, jobs: int, size: int) -> None:
        with self._lock:
            self._queued -= jobs
            self._queued_bytes -= size

    # --- repeats of unanswered jobs ------------------------------------------------------

    def first_seen(self, key: str, correlation: bytes | None) -> None:
        with self._lock:
            self._first_correlation[key] = correlation

    def repeat(self, key: str, correlation: bytes | None) -> bool:
        """A repeat of a job the journal holds unanswered: False when its answer came
        meanwhile (then it is stored: replay it); a repeat from another correlation than
        the first waits for the answer."""
        with self._lock:
            if key not in self._first_correlation:
                return False
            if self._first_correlation[key] != correlation:
                self._repeats.setdefault(key, []).append(correlation)
            return True

    def answered(self, key: str) -> list[bytes | None]:
        """The job's answer is recorded: the correlations of the repeats that waited."""
        with self._lock:
            self._first_correlation.pop(key, None)
            return self._repeats.pop(key, [])

    # --- cancel switches -----------------------------------------------------------------

    @contextmanager
    def cancel_switch(self, key: str) -> Iterator[threading.Event]:
        """The switch a cancel request naming this job sets, while the job runs."""
        cancel = threading.Event()
        with self._lock:
            self._running[key] = cancel
        try:
            yield cancel
        finally:
            with self._lock:
                self._running.pop(key, None)

    def cancel(self, key: str) -> bool:
        """Set the running job's cancel switch; False when no such job runs."""
        with self._lock:
            event = self._running.get(key)
        if event is None:
            return False
        event.set()
        return True

    # --- who runs what since when --------------------------------------------------------

    @contextmanager
    def busy(self) -> Iterator[None]:
        """The calling thread runs a job meanwhile."""
        name = threading.current_thread().name
        with self._lock:
            self._busy_since[name] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._busy_since.pop(name, None)

    def anyone_busy(self) -> bool:
        with self._lock:
            return bool(self._busy_since)

    def longest(self) -> tuple[str, float] | None:
        """The thread whose running job started first, and for how many seconds it has run."""
        now = time.monotonic()
        with self._lock:
            if not self._busy_since:
                return None
            name, since = min(self._busy_since.items(), key=lambda kv: kv[1])
        return name, now - since
