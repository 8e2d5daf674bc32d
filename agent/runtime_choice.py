"""The reconciler's side of runtime choice: auto-tune or pinned list, then failover.

`ModelLoader.load` serves a fetched model version on the runtime its preference asks for
(runtimes/autotune.py: `["auto"]` tunes, a list pins an order), with the reconciler's health
gate judging every candidate's warm-up; `serving` wraps the outcome in a ServingModel that
agent/failover.py watches; `load_next` loads a failover candidate for a failing model.

A multi-model version (`ocr`: det, rec, cls) is loaded role by role, each model with its own
runtime choice and warm-up (`role_warmup_inputs`), and served by `serving_roles` as one
ServingModel holding all its sessions.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from edgeinfer.agent import faults, health_gate
from edgeinfer.agent.config import AgentConfig
from edgeinfer.agent.failover import EmitEvent, FailoverManager, OnSwapped, RuntimeFault
from edgeinfer.agent.served import ServedModels, ServingModel, tensor_metadata
from edgeinfer.agent.store import ModelStore
from edgeinfer.contract import documents
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.contract.manifest import ModelSpec, RoleModel
from edgeinfer.runtimes.autotune import Choice, Tolerance, Tuned, choose, load_choice
from edgeinfer.runtimes.autotune_cache import AutotuneCache
from edgeinfer.runtimes.base import LoadOptions, Session
from edgeinfer.runtimes.hardware import HardwareInfo
from edgeinfer.runtimes.pipelines import MULTI_MODEL_TASKS, task_module
from edgeinfer.runtimes.quantize import Int8Plan
from edgeinfer.runtimes.selection import Attempt, WarmupCheck, WarmupFeed, is_auto

AUTOTUNE_FILE = "autotune.json"


def attempt_reports(attempts: list[Attempt]) -> list[documents.Attempt]:
    """Runtimes tried, as `reported` lists them."""
    return [documents.Attempt(runtime=a.runtime, device=a.device, ok=a.ok, reason=a.reason)
            for a in attempts]


def candidate_reports(tuned: Tuned) -> list[documents.Candidate]:
    """The candidates auto-tuning measured, as `reported` lists them ([] when pinned)."""
    return [documents.Candidate(**r.to_json()) for r in tuned.candidates]


def autotune_report(tuned: Tuned) -> documents.Autotune | None:
    """How auto-tuning chose (`reported` and `model_serving`); None when pinned."""
    summary = tuned.summary()
    return None if summary is None else documents.Autotune(**summary)


@dataclass
class RoleLoaded:
    """One model of a multi-model version, loaded and warmed up on its own runtime."""

    model: RoleModel
    tuned: Tuned

    def report(self) -> documents.RoleEntry:
        """This model's entry in `reported.models[].roles`."""
        session = self.tuned.session
        return documents.RoleEntry(
            file=self.model.file,
            sha256=self.model.sha256,
            runtime=session.runtime,
            device=session.device,
            precision=self.tuned.choice.precision,
            candidates=candidate_reports(self.tuned),
            autotune=autotune_report(self.tuned),
            attempts=attempt_reports(self.tuned.attempts),
        )


@dataclass
class Serving:
    """A served model version and what its `reported` entry says about how it was chosen."""

    model: ServingModel
    tuned: Tuned  # of the first role for a multi-model version
    roles: dict[str, RoleLoaded] | None = None  # multi-model versions only

    def entry(self, spec: ModelSpec) -> documents.ModelEntry:
        """The version's entry in `reported.models` now that it serves: how it was chosen,
        and what a job sends and gets back (which builds a single model's pipeline now
        rather than on its first job)."""
        tuned = self.tuned
        inputs: list[documents.TensorMetadata] | msgspec.UnsetType = msgspec.UNSET
        outputs: list[documents.TensorMetadata] | msgspec.UnsetType = msgspec.UNSET
        try:
            ins, outs = self.model.tensors()
            inputs, outputs = tensor_metadata(ins), tensor_metadata(outs)
        except JobError:
            pass  # the pipeline cannot be built: left out; each job is told why (UNAVAILABLE)
        return documents.ModelEntry(
            name=spec.name, version=spec.version, sha256=spec.sha256, state="serving",
            runtime=tuned.session.runtime, device=tuned.session.device,
            attempts=attempt_reports(tuned.attempts),
            precision=tuned.choice.precision,
            candidates=candidate_reports(tuned),
            autotune=autotune_report(tuned),
            failovers=[],
            roles=(msgspec.UNSET if self.roles is None
                   else {role: r.report() for role, r in self.roles.items()}),
            task=spec.task, inputs=inputs, outputs=outputs,
            traffic=msgspec.UNSET if spec.traffic is None else spec.traffic,
            shadow=True if spec.shadow else msgspec.UNSET,
        )


def task_warmup_inputs(task: str) -> WarmupFeed | None:
    """A single-model task's own warm-up inputs (its module's `warmup_inputs()`), for when
    the manifest gives no health inputs; None where the synthetic ones do, or where the
    task cannot run here (building its pipeline says why)."""
    if task in MULTI_MODEL_TASKS:
        return None
    try:
        module = task_module(task)
    except ValueError:
        return None
    make = getattr(module, "warmup_inputs", None)
    return None if make is None else WarmupFeed(make())


def role_warmup_inputs(task: str, role: str) -> dict[str, np.ndarray]:
    """Inputs a model of `role` warms up on (the synthetic 1x1 image is too small for ocr's
    detector). Raises ValueError when the task cannot run here (its library is missing)."""
    inputs: dict[str, np.ndarray] = task_module(task).warmup_inputs(role)
    return inputs


class ModelLoader:
    def __init__(self, cfg: AgentConfig, hw: HardwareInfo, store: ModelStore,
                 registry: ServedModels, emit: EmitEvent, on_swapped: OnSwapped,
                 swap_lock: threading.RLock) -> None:
        self._cfg = cfg
        self._hw = hw
        self._store = store
        self.cache = AutotuneCache(cfg.state_path / AUTOTUNE_FILE)
        # Test hook only (agent/faults.py): read once, here.
        self.fault = RuntimeFault(faults.failing_runtime_from_env())
        self.failover = FailoverManager(registry, cfg.runtime.failover_after, self.load_next,
                                        on_swapped, emit, swap_lock)
        # Each version's quantized model (`quantize: int8`), for a failover onto int8.
        self._int8_paths: dict[tuple[str, str], Path] = {}

    def _options(self, spec: ModelSpec) -> LoadOptions:
        return LoadOptions(threads=self._cfg.runtime.threads, instances=spec.instances)

    def tunes(self, spec: ModelSpec) -> bool:
        """Whether `spec` is auto-tuned (its int8 candidates are tried only then)."""
        try:
            return is_auto(spec.runtime.prefer or self._cfg.runtime.prefer)
        except ValueError:
            return False  # a bad preference list: loading says why

    def load(self, spec: ModelSpec, path: Path, sample_inputs: Mapping[str, Any] | None,
             check: WarmupCheck, *, sha256: str | None = None,
             int8: Int8Plan | None = None) -> Tuned:
        """Raises NoRuntimeError when nothing works, ValueError for a bad preference.

        `path`, `sha256`: another model of the version than its artifact (a role of a
        multi-model version), tuned and cached as its own file. `int8`: its quantized
        model's candidates (agent/int8.py).
        """
        if int8 is not None and int8.path is not None:
            self._int8_paths[spec.key] = int8.path
        tolerance = None if spec.health is None else Tolerance(spec.health.rtol, spec.health.atol)
        return choose(
            path,
            spec.runtime.prefer or self._cfg.runtime.prefer,
            self._hw,
            self._options(spec),
            sha256=sha256 or spec.sha256,
            budget_s=self._cfg.runtime.autotune_budget_s,
            sample_inputs=sample_inputs,
            check=check,
            tolerance=tolerance,
            cache=self.cache,
            int8=int8,
        )

    def serving(self, spec: ModelSpec, tuned: Tuned) -> Serving:
        model = ServingModel(spec, self.fault.wrap(tuned.session), tuned.attempts)
        self.failover.attach(model, tuned.fallbacks)
        return Serving(model, tuned)

    def serving_roles(self, spec: ModelSpec, loaded: Mapping[str, RoleLoaded]) -> Serving:
        """One ServingModel over every model of a multi-model version (first role first).

        Such a version does not fail over to other runtimes: its watch has no candidates, so
        a failing one is reported (`runtime_failover_failed`) and keeps serving.
        """
        roles = dict(loaded)
        sessions = {role: self.fault.wrap(r.tuned.session) for role, r in roles.items()}
        main = next(iter(roles))
        model = ServingModel(spec, sessions[main], roles[main].tuned.attempts, sessions=sessions)
        self.failover.attach(model, [])
        return Serving(model, roles[main].tuned, roles)

    def reload(self, spec: ModelSpec, path: Path, choice: Choice,
               sample: Mapping[str, Any] | None) -> Session:
        """A lazy version's session again, on the runtime chosen at deploy, warmed up
        through the health gate (no latency budget); raises JobError(UNAVAILABLE)."""

        def gate(session: Session, feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
            health_gate.judge(session, feed, outputs, spec.health, check_latency=False)

        warm = load_choice(path, choice, self._options(spec), sample, gate)
        if isinstance(warm, str):
            raise JobError(Code.UNAVAILABLE, f"{spec.name}:{spec.version} could not be loaded "
                           f"again on {choice.runtime}/{choice.device}: {warm}")
        return self.fault.wrap(warm.session)

    def load_next(self, old: ServingModel, choice: Choice) -> ServingModel | str:
        """`choice` loaded and warmed up through the health gate (no latency budget)."""
        spec = old.spec
        try:
            sample = health_gate.sample_inputs(spec.health) or task_warmup_inputs(spec.task)
        except health_gate.HealthError as exc:
            return str(exc)

        def gate(session: Session, feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
            health_gate.judge(session, feed, outputs, spec.health, check_latency=False)

        warm = load_choice(self._store.path_for(spec.sha256), choice, self._options(spec), sample,
                           gate, self._int8_paths.get(spec.key))
        if isinstance(warm, str):
            return warm
        attempts = [*old.attempts, Attempt(choice.runtime, choice.device, ok=True, reason="")]
        return ServingModel(spec, self.fault.wrap(warm.session), attempts)


def failover_record(old: ServingModel, new: ServingModel, reason: str) -> documents.Failover:
    """One entry of a model's reported `failovers`."""
    return documents.Failover(
        from_=f"{old.session.runtime}/{old.session.device}",
        to=f"{new.session.runtime}/{new.session.device}",
        reason=reason,
        at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )
