"""Live failover: a serving runtime that starts failing jobs is demoted to the next candidate.

The FailoverManager is the scheduler's RunObserver (agent/workers.py; agent/daemon.py
hands it over): the workers tell it each run's outcome (`failed`, `returned`), and it keeps
a `RunWatch` per ServingModel it was asked to `attach`. A run fails when the runtime
raises, or when a floating-point output holds NaN or Inf although every floating-point
input was finite. After `runtime.failover_after` consecutive failed runs (default 3) the
watch fires once; the failover thread then loads the model's next candidate (the
auto-tuner's next fastest agreeing candidate, or the next entry of a pinned preference
list), warms it up through the same health gate, and swaps a new `ServingModel` in with
`ServedModels.replace`: jobs in flight finish on the old one (those that fail get their
INTERNAL answers as before), new jobs go to the new one. Event `runtime_failover` says
from what to what and why; `runtime_failover_failed` says that no candidate was left or
none loaded, and the old one keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeinfer.agent import faults
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.runtimes.autotune import Choice
from edgeinfer.runtimes.base import Session, one_line

log = logging.getLogger(__name__)

# Loads `choice` for the model `old` serves: the new ServingModel (not yet swapped in), or
# the reason it could not be had.
LoadNext = Callable[[ServingModel, Choice], "ServingModel | str"]
# Told after a swap, under the swap lock: (old, new, the new one's candidate, reason).
OnSwapped = Callable[[ServingModel, ServingModel, Choice, str], None]
EmitEvent = Callable[..., None]


class RunWatch:
    """Consecutive failed runs of one ServingModel; fires `on_failing(reason)` once."""

    def __init__(self, threshold: int, fallbacks: Sequence[Choice],
                 on_failing: Callable[[str], None]) -> None:
        self.threshold = max(1, threshold)
        self.fallbacks = list(fallbacks)
        self._on_failing = on_failing
        self._lock = threading.Lock()
        self.consecutive = 0
        self.fired = False

    def ok(self) -> None:
        with self._lock:
            self.consecutive = 0

    def failed(self, reason: str) -> None:
        with self._lock:
            self.consecutive += 1
            fire = self.consecutive >= self.threshold and not self.fired
            if fire:
                self.fired = True
            count = self.consecutive
        if fire:
            self._on_failing(f"{count} consecutive failed runs; the last: {reason}")

    def returned(self, inputs: Sequence[Mapping[str, np.ndarray]],
                 results: Sequence[Mapping[str, np.ndarray]]) -> None:
        """A run returned; NaN/Inf from finite inputs counts as a failure.

        Only floating-point outputs are looked at (np.isfinite on the outputs; the inputs
        only when an output is not finite), so an integer model pays nothing.
        """
        for outputs in results:
            for name, arr in outputs.items():
                if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                    if not _finite_inputs(inputs):
                        return  # NaN in, NaN out: the client's data, neither good nor bad
                    self.failed(f"output {name!r} holds NaN or Inf for finite inputs")
                    return
        self.ok()


def _finite_inputs(inputs: Sequence[Mapping[str, np.ndarray]]) -> bool:
    return all(bool(np.isfinite(a).all()) for feed in inputs for a in feed.values()
               if a.dtype.kind in "fc")


@dataclass(frozen=True)
class _Demotion:
    model: ServingModel
    reason: str


class FailoverManager:
    """The failover thread: demotes failing models one at a time, never on a job thread;
    and the workers' RunObserver, counting each attached model's failed runs."""

    def __init__(self, registry: ServedModels, threshold: int, load_next: LoadNext,
                 on_swapped: OnSwapped, emit: EmitEvent, swap_lock: threading.RLock) -> None:
        self._registry = registry
        self._threshold = threshold
        self._load_next = load_next
        self._on_swapped = on_swapped
        self._emit = emit
        self._swap_lock = swap_lock  # held by the reconciler while it applies a manifest
        self._queue: queue.Queue[_Demotion | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # A retired model's watch goes with it.
        self._watches: weakref.WeakKeyDictionary[ServingModel, RunWatch] = (
            weakref.WeakKeyDictionary())
        self._watches_lock = threading.Lock()
        self.failovers = 0

    def attach(self, model: ServingModel, fallbacks: Sequence[Choice]) -> None:
        """Watch `model`'s runs; `fallbacks` are its next candidates, in order."""
        # Weakly: the watch is the dictionary's value, and must not keep its key alive.
        ref = weakref.ref(model)

        def on_failing(reason: str) -> None:
            failing = ref()
            if failing is not None:
                self._queue.put(_Demotion(failing, reason))

        with self._watches_lock:
            self._watches[model] = RunWatch(self._threshold, fallbacks, on_failing)

    def watch(self, model: ServingModel) -> RunWatch | None:
        with self._watches_lock:
            return self._watches.get(model)

    # --- RunObserver (agent/workers.py): told on the job threads ------------------------

    def failed(self, model: ServingModel, exc: BaseException) -> None:
        """A run of `model` raised."""
        watch = self.watch(model)
        if watch is not None:
            watch.failed(f"{type(exc).__name__}: {one_line(exc, 300)}")

    def returned(self, model: ServingModel, inputs: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> None:
        """A run of `model` returned `outputs` for `inputs`."""
        watch = self.watch(model)
        if watch is not None:
            watch.returned(inputs, outputs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="failover", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.demote(item.model, item.reason)
            except Exception:
                log.exception("failover of %s failed", item.model.label)

    def _serving(self, model: ServingModel) -> bool:
        return any(m is model for m in self._registry.snapshot())

    def demote(self, old: ServingModel, reason: str) -> ServingModel | None:
        """Swap the next workable candidate in for `old`; the new model, or None."""
        watch = self.watch(old)
        if watch is None or not self._serving(old):
            return None
        was = f"{old.session.runtime}/{old.session.device}"
        log.warning("%s on %s is failing (%s); demoting it", old.label, was, reason)
        tried: list[str] = []
        for index, choice in enumerate(watch.fallbacks):
            new = self._load_next(old, choice)
            if isinstance(new, str):
                tried.append(f"{choice.label}: {new}")
                log.warning("%s: failover candidate %s failed: %s", old.label, choice.label, new)
                continue
            self.attach(new, watch.fallbacks[index + 1 :])
            with self._swap_lock:
                current = self._registry.snapshot()
                if not any(m is old for m in current):  # a deploy replaced it meanwhile
                    new.retire()
                    return None
                self._registry.replace([new if m is old else m for m in current])
                self._on_swapped(old, new, choice, reason)
            self.failovers += 1
            log.warning("%s failed over from %s to %s", old.label, was, choice.label)
            self._emit("runtime_failover", model=old.spec.name, version=old.spec.version,
                       from_runtime=old.session.runtime, from_device=old.session.device,
                       runtime=choice.runtime, device=choice.device, precision=choice.precision,
                       reason=reason, skipped=tried)
            return new
        message = (f"{old.label} on {was} is failing ({reason}) and no other runtime could take "
                   f"over: {'; '.join(tried) or 'no candidate left'}")
        log.error("%s", message)
        self._emit("runtime_failover_failed", model=old.spec.name, version=old.spec.version,
                   runtime=old.session.runtime, device=old.session.device, reason=reason,
                   message=message)
        return None


class RuntimeFault:
    """TEST HOOK: wraps serving sessions of the armed runtime (faults.failing_runtime_from_env)."""

    def __init__(self, armed: tuple[str, int] | None) -> None:
        self.armed = armed
        self._lock = threading.Lock()
        self.calls = 0

    def wrap(self, session: Session) -> Session:
        if self.armed is None or session.runtime != self.armed[0]:
            return session
        return _FailingSession(session, self)

    def _tick(self) -> int:
        with self._lock:
            self.calls += 1
            return self.calls


class _FailingSession:
    def __init__(self, inner: Session, fault: RuntimeFault) -> None:
        self._inner = inner
        self._fault = fault
        self.runtime = inner.runtime
        self.device = inner.device
        self.inputs = inner.inputs
        self.outputs = inner.outputs

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        n = self._fault._tick()
        armed = self._fault.armed
        if armed is not None and n >= armed[1]:
            raise RuntimeError(f"TEST HOOK {faults.FAIL_RUNTIME_ENV}: {self.runtime} inference #{n} fails")
        return self._inner.infer(inputs, outputs)

    def close(self) -> None:
        self._inner.close()
