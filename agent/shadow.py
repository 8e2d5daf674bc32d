"""Shadow versions: a copy of each job of their name, run off the job's path, never sent.

When a name has a `shadow` version serving (manifest `shadow: true`), each job of that
name that named no version and that a serving version answered (an OK answer) is copied
here by its worker right after the answer went to the group commit (agent/workers.py):
the copy holds the job's checked inputs, the outputs it asked for and the answer's
tensors. One thread of its own, at the lowest CPU priority the OS gives it (nice 19 on
Linux, which applies per thread; a runtime's own pool threads, made when the shadow was
loaded, keep theirs), runs each copy on the shadow version and compares:

- classification tasks (`image-classification`): agreement is the same top-1 class in
  every row (the answers' `classes`, else `labels`, first column; else argmax of `scores`);
- every other task: the same outputs, each `numpy.allclose` with the shadow entry's
  `health.rtol`/`health.atol` (defaults 1e-3/1e-5) for floats, equal for the rest.

The figures (agent/metrics.py `record_shadow`) go into telemetry's `inference.shadows`
and the shadow's `reported.models[].shadow_stats`. Nothing here is journaled, published
or waited for by a job, and a shadow's failure never reaches an answer: it is counted
(`errors`). The backlog is bounded: a copy that finds it full is
dropped and counted (by count, `jobs.shadow_backlog`, and by the bytes of the tensors the
copies hold, `jobs.shadow_backlog_bytes`), as is one whose shadow was gone by its turn and
those still waiting at a stop (copies are not kept across a restart).

With no shadow anywhere, a run's whole cost is ServedModels.shadow_of's test of an empty
dict.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import numpy as np

from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.contract.documents import ModelEntry
from edgeinfer.contract.errors import JobError
from edgeinfer.contract.manifest import Health
from edgeinfer.contract.telemetry import ShadowFigures
from edgeinfer.runtimes.base import Session
from edgeinfer.runtimes.pipelines.base import StreamingPipeline

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]

# Tasks whose answer is a class per row: judged on the top-1 class, not on scores.
CLASSIFICATION_TASKS = frozenset({"image-classification"})
TOP1 = "top1"
ALLCLOSE = "allclose"
_LOWEST_PRIORITY = 19  # nice value of the lane's thread


@dataclass(frozen=True)
class Copy:
    """One job's copy for the shadow version `name:version`."""

    name: str
    version: str
    inputs: Tensors  # the job's checked inputs (read only, shared with the job)
    wanted: Sequence[str] | None  # the outputs the job asked for (None: all)
    answered: Tensors  # what the serving version answered
    serving_ms: float  # the serving version's run (a batch's whole run when batched)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    def nbytes(self) -> int:
        """What the copy holds in memory: its tensors' bytes (a BYTES tensor's items)."""
        return sum(_nbytes(a) for a in (*self.inputs.values(), *self.answered.values()))


def _nbytes(a: np.ndarray) -> int:
    if a.dtype != object:
        return int(a.nbytes)
    return sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in a.ravel())


def way_of_comparing(task: str) -> str:
    return TOP1 if task in CLASSIFICATION_TASKS else ALLCLOSE


def _top1(outputs: Tensors) -> np.ndarray | None:
    for name in ("classes", "labels"):
        if name in outputs and np.ndim(outputs[name]) == 2:
            return np.asarray(outputs[name])[:, 0]
    if "scores" in outputs:
        return np.asarray(np.argmax(outputs["scores"], axis=-1))
    return None


def agree(how: str, answered: Tensors, shadow: Tensors, rtol: float, atol: float) -> bool:
    """Whether the shadow's outputs agree with the answer's (the module's docstring)."""
    if how == TOP1:
        ours, theirs = _top1(answered), _top1(shadow)
        return (ours is not None and theirs is not None and ours.shape == theirs.shape
                and bool(np.array_equal(ours, theirs)))
    if set(answered) != set(shadow):
        return False
    for name, a in answered.items():
        x, y = np.asarray(a), np.asarray(shadow[name])
        if x.shape != y.shape:
            return False
        if x.dtype.kind in "fc" and y.dtype.kind in "fc":
            if not np.allclose(x, y, rtol=rtol, atol=atol):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def run_on(model: ServingModel, inputs: Tensors, wanted: Sequence[str] | None) -> Tensors:
    """A job's outputs on `model`, held by the caller: through its pipeline (a streaming
    one's whole answer at once) or its session."""
    pipeline = model.pipeline()
    if pipeline is None:
        return model.session.infer(inputs, wanted)
    session = cast(Session, model.pipeline_session)  # as agent/workers.py runs it
    if isinstance(pipeline, StreamingPipeline):
        produced = pipeline.run(session, inputs, None)
    else:
        produced = pipeline.run(session, inputs)
    return {k: v for k, v in produced.items() if wanted is None or k in wanted}


class ShadowLane:
    """The bounded backlog of copies and the thread that runs them (the module's docstring).
    `offer` is called by workers; everything else happens on the lane's thread."""

    def __init__(self, registry: ServedModels, metrics: Metrics, backlog: int,
                 backlog_bytes: int = 64 * 1024 * 1024) -> None:
        self._registry = registry
        self._metrics = metrics
        self._backlog = backlog
        self._backlog_bytes = backlog_bytes
        self._copies: deque[tuple[Copy, int]] = deque()  # with its nbytes
        self._held = 0  # bytes in `_copies`
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def offer(self, copy: Copy) -> None:
        """Queue a copy; never waits: a full backlog drops it (counted)."""
        size = copy.nbytes()
        with self._cond:
            taken = (not self._stopping and len(self._copies) < self._backlog
                     and self._held + size <= self._backlog_bytes)
            if taken:
                self._copies.append((copy, size))
                self._held += size
                self._cond.notify()
        if not taken:
            self._metrics.shadow_dropped(copy.label)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shadow-lane", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            left, self._copies, self._held = list(self._copies), deque(), 0
            self._cond.notify_all()
        for copy, _ in left:
            self._metrics.shadow_dropped(copy.label)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:  # only this thread: Linux applies a nice value per thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOWEST_PRIORITY)
        except (OSError, AttributeError) as exc:
            log.debug("shadow lane keeps its priority: %s", exc)
        while True:
            with self._cond:
                while not self._copies and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                copy, size = self._copies.popleft()
                self._held -= size
            try:
                self.run(copy)
            except Exception:  # a bug of ours: the lane must go on for the next copy
                log.exception("shadow copy for %s failed", copy.label)

    def run(self, copy: Copy) -> None:
        """Run one copy on its shadow version and record the comparison."""
        try:
            model = self._registry.acquire(copy.name, copy.version)
        except JobError:  # the shadow was undeployed meanwhile
            self._metrics.shadow_dropped(copy.label)
            return
        how = way_of_comparing(model.spec.task)
        health = model.spec.health or Health()
        try:
            with model.instances:  # the manifest's `instances` bound holds for copies too
                started = time.monotonic()
                outputs = run_on(model, copy.inputs, copy.wanted)
                shadow_ms = (time.monotonic() - started) * 1000.0
        except Exception as exc:
            log.debug("shadow %s failed on a copy: %s", copy.label, exc)
            self._metrics.record_shadow(copy.label, how, None, copy.serving_ms, None)
            return
        finally:
            model.release()
        agreed = agree(how, copy.answered, outputs, health.rtol, health.atol)
        self._metrics.record_shadow(copy.label, how, agreed, copy.serving_ms, shadow_ms)


def with_shadow_stats(statuses: Sequence[ModelEntry],
                      figures: Mapping[str, Mapping[str, object]]) -> list[ModelEntry]:
    """`reported.models` with each serving shadow's figures (`shadow_stats`), from
    Metrics.shadow_figures(); entries without figures are left as they are."""
    out = []
    for entry in statuses:
        got = figures.get(f"{entry.name}:{entry.version}") if entry.shadow is True else None
        out.append(entry if got is None or entry.state != "serving" else
                   msgspec.structs.replace(entry,
                                           shadow_stats=msgspec.convert(got, ShadowFigures)))
    return out
