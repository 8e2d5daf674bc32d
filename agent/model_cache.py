"""The model cache: `load: lazy` versions loaded on their first job, under a memory budget.

A version whose manifest entry says `load: lazy` is fetched, verified, loaded, warmed up and
health-gated at deploy like any other (agent/bring_up.py), its memory measured (the growth
of the agent's memory in use over that load and warm-up: `ServingModel.memory_mb`,
`memory_in_use_mb`), and then unloaded: it
serves (jobs may name it) but holds no session until a job needs one. After a restart it is
restored the same way, unloaded.

The policy, with `models.memory_budget_mb` (default: no budget):

- The budget counts the measured memory of every served version that is loaded now: eager
  ones (always loaded; the cache never unloads them) and lazy ones.
- Loading a lazy version that would go over it first unloads the least recently used lazy
  version that is loaded, not pinned (`pin: true`) and has no job in flight, then the next,
  until it fits. A version with a job in flight is never unloaded.
- When it cannot fit yet (the candidates all have jobs in flight), the job waits for one to
  finish, up to its deadline; past it, the job is answered DEADLINE_EXCEEDED like any job
  whose deadline passed. It never fails for the wait alone. Only a version that cannot fit
  even with every lazy unpinned version unloaded (beside the eager and the pinned ones
  loaded) is answered RESOURCE_EXHAUSTED at once, naming the figures; one that cannot fit
  alone was refused at deploy (agent/bring_up.py).
- One load at a time in the whole agent: the budget's figures and the RSS stay true while a
  load runs, and a second job for the version being loaded waits for that load.
- `models.idle_unload_s`: a loaded, unpinned lazy version whose last job ended (or began)
  that long ago is unloaded by the cache's timer thread.

Threads: `ensure` runs on the worker that took the job (never on the broker's socket
thread, nor the intake's: a lazy version's jobs are never run inline, agent/workers.py).
Lock order: the cache's lock, then a ServingModel's (its `detach`); the registry's lock is
taken alone (`snapshot`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgeinfer.agent.config import ModelsConfig
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.runtimes.base import Session

log = logging.getLogger(__name__)

EmitEvent = Callable[..., None]
# Loads and warms up a lazy version's session again (its runtime chosen at deploy); raises
# JobError(UNAVAILABLE) saying why it could not.
Reload = Callable[[], Session]

# How often a waiting job looks again without being woken (a load or a job's end wakes it).
_RECHECK_S = 0.5


class Lazy:
    """A lazy version's place in the cache (`ServingModel.lazy`)."""

    def __init__(self, cache: ModelCache, reload: Reload, pinned: bool) -> None:
        self.cache = cache
        self.reload = reload
        self.pinned = pinned
        # When its last job began or ended (time.monotonic()); a float written without a
        # lock: LRU and idle order need no more.
        self.last_used = time.monotonic()

    def ensure(self, model: ServingModel, deadline: float | None) -> None:
        """Called by a job holding `model` (acquired): return once it is loaded."""
        self.last_used = time.monotonic()
        if model.loaded:  # held by this job: the cache cannot unload it under us
            return
        self.cache.load_for(model, self.reload, deadline)

    def released(self) -> None:
        """A job let go of the version: it may now be unloaded, which a waiting load needs."""
        self.last_used = time.monotonic()
        self.cache.wake()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on a C library without it (musl)."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_trim = _malloc_trim()
_MB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _find_mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's (2.33+) mallinfo2, or None."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info: Callable[[], _MallInfo2] = fn
    return info


_mallinfo2 = _find_mallinfo2()


def memory_in_use_mb(rss: Callable[[], int]) -> float:
    """The memory the agent holds now, in MB, as a version's load and warm-up are measured
    by: the bytes allocated and not freed (glibc's mallinfo2: heap and mmapped chunks; ONNX
    Runtime's and OpenVINO's tensors and weights come from there). Not the RSS growth:
    glibc reuses heap freed earlier (an unloaded version's) without the RSS moving, so a
    version loaded after another was unloaded would seem to take nothing. Where mallinfo2
    is missing (musl), the RSS (`rss()`, bytes) with the freed heap given back first."""
    if _mallinfo2 is not None:
        info = _mallinfo2()
        return float(info.uordblks + info.hblkhd) / _MB
    give_back_memory()
    return float(rss()) / _MB


def close_sessions(label: str, sessions: Sequence[Session]) -> None:
    """Close a version's sessions and give the memory they held back to the system: glibc
    keeps freed heap for reuse, so without the trim the agent's RSS would not go down (and
    the next version measured at deploy would seem to take nothing)."""
    for session in sessions:
        try:
            session.close()
        except Exception:
            log.exception("closing %s failed", label)
    if sessions:
        give_back_memory()


def give_back_memory() -> None:
    if _trim is not None:
        _trim(0)


def mb(value: float | None) -> float:
    return 0.0 if value is None else value


class ModelCache:
    def __init__(self, registry: ServedModels, cfg: ModelsConfig, emit: EmitEvent,
                 on_change: Callable[[], None]) -> None:
        self._registry = registry
        self.budget_mb = cfg.memory_budget_mb
        self.idle_unload_s = cfg.idle_unload_s
        self._emit = emit
        self._on_change = on_change
        self._cond = threading.Condition()
        self._loading: ServingModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lazy(self, reload: Reload, pinned: bool) -> Lazy:
        return Lazy(self, reload, pinned)

    # --- the timer thread ----------------------------------------------------------------

    def start(self) -> None:
        if self.idle_unload_s is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._idle_loop, name="model-cache", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def _idle_loop(self) -> None:
        assert self.idle_unload_s is not None
        period = min(1.0, self.idle_unload_s / 4)
        while not self._stop.wait(period):
            try:
                self.unload_idle()
            except Exception:
                log.exception("unloading idle models failed")

    def unload_idle(self, now: float | None = None) -> list[ServingModel]:
        """Unload every loaded, unpinned lazy version idle for models.idle_unload_s."""
        if self.idle_unload_s is None:
            return []
        now = time.monotonic() if now is None else now
        done: list[tuple[ServingModel, list[Session]]] = []
        with self._cond:
            for m in self._registry.snapshot():
                if (m.lazy is None or m.lazy.pinned or not m.loaded or m is self._loading
                        or now - m.lazy.last_used < self.idle_unload_s):
                    continue
                sessions = m.detach()
                if sessions is not None:
                    done.append((m, sessions))
        for m, sessions in done:
            self._unloaded(m, sessions, "idle")
        if done:
            self._on_change()
        return [m for m, _ in done]

    # --- loading on demand ---------------------------------------------------------------

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def load_for(self, model: ServingModel, reload: Reload, deadline: float | None) -> None:
        """Load `model` (held by the caller's job), making room under the budget first;
        waits (up to `deadline`) for another load, or for a version to be free to unload.
        Raises JobError: DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (can never fit),
        UNAVAILABLE (its runtime would not load it again)."""
        with self._cond:
            while True:
                if model.loaded:
                    return
                if self._loading is None:
                    victims = self._room_for(model)
                    if victims is not None:
                        self._loading = model
                        break
                left = _RECHECK_S if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise JobError(Code.DEADLINE_EXCEEDED,
                                   f"the job's deadline passed while {model.label} waited "
                                   "to be loaded (models.memory_budget_mb)")
                self._cond.wait(min(left, _RECHECK_S))
        try:
            for victim, sessions in victims:
                self._unloaded(victim, sessions, "budget", to_load=model.label)
            started = time.monotonic()
            model.install(reload())
            give_back_memory()  # what the load read and let go (the model file's bytes)
            load_ms = (time.monotonic() - started) * 1000.0
            log.info("%s loaded on demand in %.1f ms", model.label, load_ms)
            self._emit("model_loaded", model=model.spec.name, version=model.spec.version,
                       load_ms=round(load_ms, 3), memory_mb=model.memory_mb)
        finally:
            with self._cond:
                self._loading = None
                self._cond.notify_all()
        self._on_change()

    def _room_for(self, model: ServingModel) -> list[tuple[ServingModel, list[Session]]] | None:
        """Under the lock: the versions unloaded (detached, to be closed) to make room for
        `model`, or None when it cannot fit yet. Raises JobError(RESOURCE_EXHAUSTED) when
        it can never fit."""
        if self.budget_mb is None:
            return []
        need = mb(model.memory_mb)
        loaded = [m for m in self._registry.snapshot() if m is not model and m.loaded]
        used = sum(mb(m.memory_mb) for m in loaded)
        if used + need <= self.budget_mb:
            return []
        fixed = sum(mb(m.memory_mb) for m in loaded if m.lazy is None or m.lazy.pinned)
        if fixed + need > self.budget_mb:
            raise JobError(
                Code.RESOURCE_EXHAUSTED,
                f"{model.label} needs {need:.1f} MB and the eager and pinned models loaded "
                f"hold {fixed:.1f} MB of models.memory_budget_mb={self.budget_mb:g}: it "
                "cannot be loaded until they are gone")
        candidates = sorted((m for m in loaded if m.lazy is not None and not m.lazy.pinned),
                            key=lambda m: m.lazy.last_used if m.lazy is not None else 0.0)
        chosen: list[ServingModel] = []
        for m in candidates:
            if used + need <= self.budget_mb:
                break
            if m.inflight == 0:
                chosen.append(m)
                used -= mb(m.memory_mb)
        if used + need > self.budget_mb:
            return None  # the others have jobs in flight: wait for one to end
        victims: list[tuple[ServingModel, list[Session]]] = []
        for m in chosen:
            sessions = m.detach()
            if sessions is None:  # a job took it since: look again (it stays as it was)
                for v, s in victims:
                    close_sessions(v.label, s)  # already unloaded: finish the job
                    self._unloaded_event(v, "budget", model.label)
                return None
            victims.append((m, sessions))
        return victims

    def _unloaded(self, m: ServingModel, sessions: list[Session], reason: str,
                  to_load: str | None = None) -> None:
        close_sessions(m.label, sessions)
        self._unloaded_event(m, reason, to_load)

    def _unloaded_event(self, m: ServingModel, reason: str, to_load: str | None) -> None:
        log.info("%s unloaded (%s)", m.label, reason)
        fields: dict[str, Any] = {"reason": reason, "memory_mb": m.memory_mb}
        if to_load is not None:
            fields["for_model"] = to_load
        self._emit("model_evicted", model=m.spec.name, version=m.spec.version, **fields)
