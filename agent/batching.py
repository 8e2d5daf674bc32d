"""Dynamic batching: jobs for one model, waiting at most `max_delay_ms`, run as one batch.

A worker that brings a batchable job adds it to its model's batcher. If no worker is
forming a batch for that model, it becomes the leader: it waits until `max_batch` rows
are pending or `max_delay_ms` has passed, runs the batch, and answers every job in it,
then forms the next batch while jobs are pending. Other workers add their job and go
back to the queue at once, so they keep feeding the batch instead of waiting on it.

Only jobs whose inputs agree on everything but the first dimension (and which ask for
the same outputs) share a batch; a model is batched only when every input and output has
a dynamic first dimension.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeinfer.agent.jobs import Reply
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.protocol import RawRequest
from edgeinfer.agent.served import ServingModel
from edgeinfer.runtimes.base import TensorSpec


def batchable(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> bool:
    return all(s.shape and s.shape[0] < 0 for s in (*inputs, *outputs))


@dataclass
class Prepared:
    """A checked job, holding its model, ready to run alone or in a batch."""

    key: str
    inbound: Inbound
    reply: Reply
    request: RawRequest
    model: ServingModel
    arrays: dict[str, np.ndarray]
    wanted: list[str] | None
    deadline: float | None
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 1

    def signature(self) -> tuple[Any, ...]:
        shapes = tuple(sorted((n, a.shape[1:], a.dtype.str) for n, a in self.arrays.items()))
        return (shapes, tuple(self.wanted) if self.wanted is not None else None)


RunBatch = Callable[[list[Prepared]], None]


class Batcher:
    """One per serving model with batching on."""

    def __init__(self, max_batch: int, max_delay_ms: float, run: RunBatch) -> None:
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self._run = run
        self._cond = threading.Condition()
        self._pending: list[Prepared] = []
        self._leading = False
        self.batches = 0
        self.batched_jobs = 0

    def offer(self, job: Prepared) -> None:
        """Add a job; lead batches if nobody does. Returns when this worker may move on."""
        with self._cond:
            self._pending.append(job)
            if self._leading:
                self._cond.notify_all()
                return
            self._leading = True
        while True:
            batch = self._next_batch()
            if batch is None:
                return  # nothing pending: leadership was given up under the lock
            self.batches += 1
            self.batched_jobs += len(batch)
            self._run(batch)  # answers every job; never raises

    def _next_batch(self) -> list[Prepared] | None:
        with self._cond:
            if not self._pending:
                self._leading = False
                return None
            started = time.monotonic()
            self._cond.wait_for(
                lambda: sum(j.rows for j in self._pending) >= self.max_batch,
                timeout=max(0.0, self.max_delay_s - (time.monotonic() - started)),
            )
            return self._take()

    def _take(self) -> list[Prepared]:
        """The oldest job and the compatible ones after it, up to max_batch rows."""
        head = self._pending[0]
        sig = head.signature()
        batch: list[Prepared] = []
        rest: list[Prepared] = []
        rows = 0
        for job in self._pending:
            if job.signature() == sig and (not batch or rows + job.rows <= self.max_batch):
                batch.append(job)
                rows += job.rows
            else:
                rest.append(job)
        self._pending = rest
        return batch


def split_outputs(
    outputs: dict[str, np.ndarray], rows: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Cut a batch's outputs back into each job's rows."""
    cuts = np.cumsum(rows)[:-1]
    per_job: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, array in outputs.items():
        for i, part in enumerate(np.split(array, cuts, axis=0)):
            per_job[i][name] = part
    return per_job
