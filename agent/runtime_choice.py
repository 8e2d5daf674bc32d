"""The reconciler's side of runtime choice: auto-tune or pinned list, then failover.

`ModelLoader.load` serves a fetched model version on the runtime its preference asks for
(runtimes/autotune.py: `["auto"]` tunes, a list pins an order), with the reconciler's health
gate judging every candidate's warm-up; `serving` wraps the outcome in a ServingModel that
agent/failover.py watches; `load_next` loads a failover candidate for a failing model.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import faults, health
from agent.config import AgentConfig
from agent.failover import EmitEvent, FailoverManager, OnSwapped, RuntimeFault
from agent.manifest import ModelSpec
from agent.registry import ModelRegistry, ServingModel
from agent.store import ModelStore
from runtimes.autotune import AutotuneCache, Choice, Tolerance, Tuned, choose, load_choice
from runtimes.base import LoadOptions, Session
from runtimes.hardware import HardwareInfo
from runtimes.selection import Attempt, WarmupCheck

AUTOTUNE_FILE = "autotune.json"


@dataclass
class Serving:
    """What the reconciler reports for a served model beyond runtime and device."""

    model: ServingModel
    tuned: Tuned

    def status_fields(self) -> dict[str, Any]:
        return {
            "precision": self.tuned.choice.precision,
            "candidates": [r.to_json() for r in self.tuned.candidates],
            "autotune": self.tuned.summary(),
            "failovers": [],
        }


class ModelLoader:
    def __init__(self, cfg: AgentConfig, hw: HardwareInfo, store: ModelStore,
                 registry: ModelRegistry, emit: EmitEvent, on_swapped: OnSwapped,
                 swap_lock: threading.RLock) -> None:
        self._cfg = cfg
        self._hw = hw
        self._store = store
        self.cache = AutotuneCache(cfg.state_path / AUTOTUNE_FILE)
        # Test hook only (agent/faults.py): read once, here.
        self.fault = RuntimeFault(faults.failing_runtime_from_env())
        self.failover = FailoverManager(registry, cfg.runtime.failover_after, self.load_next,
                                        on_swapped, emit, swap_lock)

    @property
    def _options(self) -> LoadOptions:
        return LoadOptions(threads=self._cfg.runtime.threads)

    def load(self, spec: ModelSpec, path: Path, sample_inputs: Mapping[str, Any] | None,
             check: WarmupCheck) -> Tuned:
        """Raises NoRuntimeError when nothing works, ValueError for a bad preference."""
        tolerance = None if spec.health is None else Tolerance(spec.health.rtol, spec.health.atol)
        return choose(
            path,
            spec.runtime.prefer or self._cfg.runtime.prefer,
            self._hw,
            self._options,
            sha256=spec.sha256,
            budget_s=self._cfg.runtime.autotune_budget_s,
            sample_inputs=sample_inputs,
            check=check,
            tolerance=tolerance,
            cache=self.cache,
        )

    def serving(self, spec: ModelSpec, tuned: Tuned) -> Serving:
        model = ServingModel(spec, self.fault.wrap(tuned.session), tuned.attempts)
        self.failover.attach(model, tuned.fallbacks)
        return Serving(model, tuned)

    def load_next(self, old: ServingModel, choice: Choice) -> ServingModel | str:
        """`choice` loaded and warmed up through the health gate (no latency budget)."""
        spec = old.spec
        try:
            sample = health.sample_inputs(spec.health)
        except health.HealthError as exc:
            return str(exc)

        def gate(session: Session, feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
            health.judge(session, feed, outputs, spec.health, check_latency=False)

        warm = load_choice(self._store.path_for(spec.sha256), choice, self._options, sample, gate)
        if isinstance(warm, str):
            return warm
        attempts = [*old.attempts, Attempt(choice.runtime, choice.device, ok=True, reason="")]
        return ServingModel(spec, self.fault.wrap(warm.session), attempts)


def failover_record(old: ServingModel, new: ServingModel, reason: str) -> dict[str, Any]:
    """One entry of a model's reported `failovers`."""
    return {
        "from": f"{old.session.runtime}/{old.session.device}",
        "to": f"{new.session.runtime}/{new.session.device}",
        "reason": reason,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
