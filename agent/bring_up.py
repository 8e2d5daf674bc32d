"""A model version made to serve: its files fetched and verified (by the reconciler's
fetch, which watches for a newer manifest meanwhile), loaded on the runtime the choice
picks (agent/runtime_choice.py), warmed up, put through the health gate on each candidate
(agent/health_gate.py); a multi-model version (`ocr`) as a whole or not at all. What is
tried is reported: each version's entry in `reported.models` and the events
(`artifact_verified`, `model_serving`, `model_failed`). A version that failed is not tried
again until a manifest changes its files.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Set
from pathlib import Path
from typing import Any

import msgspec
import psutil

from edgeinfer.agent import faults, health_gate
from edgeinfer.agent.config import AgentConfig
from edgeinfer.agent.int8 import prepare as prepare_int8
from edgeinfer.agent.model_cache import (
    ModelCache,
    Reload,
    close_sessions,
    give_back_memory,
    memory_in_use_mb,
)
from edgeinfer.agent.runtime_choice import (
    ModelLoader,
    RoleLoaded,
    Serving,
    attempt_reports,
    autotune_report,
    failover_record,
    role_warmup_inputs,
    task_warmup_inputs,
)
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.agent.store import ArtifactError, ModelStore, version_dir_name
from edgeinfer.contract.documents import ModelEntry, RoleServing
from edgeinfer.contract.errors import JobError
from edgeinfer.contract.manifest import ManifestError, ModelSpec, RoleModel, model_roles
from edgeinfer.runtimes.autotune import Choice
from edgeinfer.runtimes.base import Session
from edgeinfer.runtimes.hardware import HardwareInfo
from edgeinfer.runtimes.quantize import CalibrationError
from edgeinfer.runtimes.selection import Attempt, NoRuntimeError, WarmupCheck

log = logging.getLogger(__name__)

EmitEvent = Callable[..., None]


class VersionBringUp:
    """Brings versions up on the reconciler's thread (a failover's report comes from
    agent/failover.py's); `statuses` may be read from any thread."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: ModelStore,
        registry: ServedModels,
        hardware: HardwareInfo,
        emit_event: EmitEvent,
        on_change: Callable[[], None],
        fetch: Callable[[ModelSpec], Path],
        crash: faults.CrashPoint,
        swap_lock: threading.RLock,
    ) -> None:
        self._store = store
        self._registry = registry
        self._emit = emit_event
        self._on_change = on_change
        self._fetch = fetch
        self._crash = crash
        self._lock = threading.Lock()
        # Each version's entry in `reported.models`, by (name, version).
        self._statuses: dict[tuple[str, str], ModelEntry] = {}
        # A failed (name, version) is not retried until the manifest changes its files
        # (by version_dir_name: the artifact's sha256 and those of its files).
        self._failed: dict[tuple[str, str], str] = {}
        self.loader = ModelLoader(cfg, hardware, store, registry, emit_event, self.failed_over,
                                  swap_lock)
        self.cache = ModelCache(registry, cfg.models, emit_event, on_change)
        self._process = psutil.Process()

    # --- status, read by the service for `reported` --------------------------------------

    def statuses(self) -> list[ModelEntry]:
        """Each version's entry, a serving one with the cache's figures of now."""
        with self._lock:
            entries = list(self._statuses.values())
        for i, entry in enumerate(entries):
            if entry.state != "serving":
                continue
            model = self._registry.find(entry.name, entry.version)
            if model is not None and model.memory_mb is not None:
                entries[i] = msgspec.structs.replace(entry, loaded=model.loaded,
                                                     memory_mb=model.memory_mb)
        return entries

    # --- memory (agent/model_cache.py) ----------------------------------------------------

    def _used_mb(self) -> float:
        return memory_in_use_mb(lambda: int(self._process.memory_info().rss))

    def _over_budget(self, spec: ModelSpec, model: ServingModel, used_before: float) -> str | None:
        """Measure `model` (just loaded and warmed up): the growth of the agent's memory in
        use since `used_before` (model_cache.memory_in_use_mb). Why it is refused when it
        cannot fit the budget even alone, else None."""
        model.memory_mb = round(max(0.0, self._used_mb() - used_before), 1)
        budget = self.cache.budget_mb
        if budget is None or model.memory_mb <= budget:
            return None
        model.retire()  # closes its sessions
        give_back_memory()
        return (f"{spec.name}:{spec.version} needs {model.memory_mb:.1f} MB (measured over its "
                f"load and warm-up), over models.memory_budget_mb="
                f"{budget:g}: it cannot be loaded even alone")

    def _go_lazy(self, spec: ModelSpec, model: ServingModel, reload: Reload) -> None:
        """A `load: lazy` version, gated and measured, gives its session back until a job
        needs it (agent/model_cache.py)."""
        if spec.load != "lazy":
            return
        model.lazy = self.cache.lazy(reload, spec.pin)
        sessions = model.detach()
        close_sessions(model.label, sessions or [])
        log.info("%s is lazy: unloaded until its first job (%.1f MB)", model.label,
                 model.memory_mb or 0.0)

    def _reweigh(self, current: ServingModel, spec: ModelSpec) -> None:
        """A serving version whose A/B `traffic` or `shadow` (or `pin`) changed takes the
        new values (no reload): the split reads them from the serving model's spec."""
        if (current.spec.traffic, current.spec.shadow, current.spec.pin) == (
                spec.traffic, spec.shadow, spec.pin):
            return
        current.spec = spec
        if current.lazy is not None:
            current.lazy.pinned = spec.pin
        with self._lock:
            status = self._statuses.get(spec.key)
            if status is not None:
                self._statuses[spec.key] = msgspec.structs.replace(
                    status, traffic=msgspec.UNSET if spec.traffic is None else spec.traffic,
                    shadow=True if spec.shadow else msgspec.UNSET)

    def set_status(self, status: ModelEntry) -> None:
        with self._lock:
            self._statuses[(status.name, status.version)] = status

    def keep_statuses(self, keys: Set[tuple[str, str]]) -> None:
        """Forget the entries of versions not in `keys` (neither wanted nor serving)."""
        with self._lock:
            self._statuses = {k: s for k, s in self._statuses.items() if k in keys}

    def bring_up(
        self, spec: ModelSpec, *, check_latency: bool = True
    ) -> tuple[ServingModel | None, str | None]:
        """Return (model, None) when it serves, (None, reason) when it failed. The fetch
        may raise what the reconciler's fetch raises (a newer manifest superseding this)."""
        current = self._registry.find(spec.name, spec.version)
        if (current is not None and version_dir_name(current.spec) == version_dir_name(spec)
                and current.spec.load == spec.load):  # eager <-> lazy: brought up anew
            self._reweigh(current, spec)
            return current, None
        if self._failed.get(spec.key) == version_dir_name(spec):
            status = self._statuses.get(spec.key)
            return None, (status.error if status and status.error else f"{spec.name} failed")
        self.set_status(ModelEntry(spec.name, spec.version, spec.sha256, "loading"))
        self._on_change()
        label = f"{spec.name}:{spec.version}"
        try:
            path = self._fetch(spec)
            model_dir = self._store.version_dir(spec)
        except (ArtifactError, OSError) as exc:
            return self._failed_to(spec, "artifact", f"{label}: {exc}",
                                   cause=exc.cause if isinstance(exc, ArtifactError) else None)
        self._emit("artifact_verified", model=spec.name, version=spec.version, sha256=spec.sha256)
        try:
            roles = model_roles(spec)  # checked when the manifest was decoded
        except ManifestError as exc:
            return self._failed_to(spec, "load", str(exc))
        if roles is not None:
            return self._bring_up_roles(spec, roles, model_dir, check_latency)
        try:
            warmup_inputs = health_gate.sample_inputs(spec.health) or task_warmup_inputs(spec.task)
        except health_gate.HealthError as exc:
            return self._failed_to(spec, "health", f"{label} failed its health check: {exc}")
        int8 = None
        if spec.quantize is not None and not self.loader.tunes(spec):
            log.warning("%s: quantize %s is an auto-tune candidate; the pinned runtime list "
                        "serves f32", label, spec.quantize)
        elif spec.quantize is not None:
            try:
                int8 = prepare_int8(spec, path, model_dir)
            except CalibrationError as exc:
                return self._failed_to(spec, "quantize", f"{label}: {exc}")
        refusals: list[str] = []
        reports: dict[int, health_gate.HealthReport] = {}  # by id(session): auto judges several
        gate = self._gate(spec, check_latency, refusals, reports)
        self._crash.reached("load")
        used_before = self._used_mb()
        try:
            # ["auto"] (the default) tunes over every runtime; a list pins an order.
            loaded = self.loader.load(spec, path, warmup_inputs, gate, int8=int8)
        except NoRuntimeError as exc:
            if refusals:
                return self._failed_to(
                    spec, "health", f"{label} failed its health check: {'; '.join(refusals)}",
                    exc.attempts,
                )
            return self._failed_to(spec, "load", f"{label}: {exc}", exc.attempts)
        except ValueError as exc:  # an unknown runtime in the preference list
            return self._failed_to(spec, "load", f"{label}: {exc}")
        served = self.loader.serving(spec, loaded)
        served.model.model_dir = model_dir
        session = loaded.session
        served.entry(spec)  # builds the pipeline now: its memory is the version's too
        refused = self._over_budget(spec, served.model, used_before)
        if refused is not None:
            return self._failed_to(spec, "memory", refused)
        self._announce_serving(spec, served, reports[id(session)].latency_ms)
        log.info("%s serving on %s/%s", label, session.runtime, session.device)
        choice = loaded.choice  # not `loaded`: it holds the session closed when lazy
        self._go_lazy(spec, served.model, lambda: self.loader.reload(
            spec, path, choice, warmup_inputs))
        return served.model, None

    def _announce_serving(self, spec: ModelSpec, served: Serving, latency_ms: float | None,
                          **event: Any) -> None:
        """A version now serves: its status in `reported` and the `model_serving` event
        (a multi-model version's runtime fields are its first model's; `event` adds fields)."""
        tuned = served.tuned
        session = tuned.session
        self._failed.pop(spec.key, None)
        self.set_status(served.entry(spec))
        self._emit(
            "model_serving",
            model=spec.name,
            version=spec.version,
            runtime=session.runtime,
            device=session.device,
            fallbacks=[f"{a.runtime}/{a.device}: {a.reason}" for a in tuned.attempts if not a.ok],
            latency_ms=None if latency_ms is None else round(latency_ms, 3),
            precision=tuned.choice.precision,
            autotune=autotune_report(tuned),
            **event,
        )

    def _gate(self, spec: ModelSpec, check_latency: bool, refusals: list[str],
              reports: dict[int, health_gate.HealthReport]) -> WarmupCheck:
        """The health gate on each candidate's warm-up: one that fails it on a runtime falls
        back to the next, like a failed load (an FP16 device's overflow, say). Reports go to
        `reports` by id(session) (auto judges several), refusals to `refusals`."""

        def gate(session: Session, feed: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
            self._crash.reached("warm-up")
            try:
                reports[id(session)] = health_gate.judge(session, feed, outputs, spec.health,
                                                    check_latency=check_latency)
            except health_gate.HealthError as exc:
                refusals.append(f"{session.runtime}/{session.device}: {exc}")
                raise

        return gate

    def _bring_up_roles(self, spec: ModelSpec, roles: list[RoleModel], model_dir: Path,
                        check_latency: bool) -> tuple[ServingModel | None, str | None]:
        """A multi-model version (`ocr`): every model loaded and warmed up, each with its own
        runtime choice (all files are already fetched and verified), and the pipeline built
        on them; or none of it, and the version fails as a whole."""
        label = f"{spec.name}:{spec.version}"
        loaded: dict[str, RoleLoaded] = {}
        latencies: dict[str, float] = {}
        used_before = self._used_mb()

        def give_up(stage: str, reason: str,
                    attempts: list[Attempt] | None = None) -> tuple[None, str]:
            for done in loaded.values():
                done.tuned.session.close()
            return self._failed_to(spec, stage, reason, attempts)

        for role in roles:
            what = f"{label}: its {role.role} model ({role.file})"
            try:
                sample = role_warmup_inputs(spec.task, role.role)
            except ValueError as exc:
                return give_up("load", f"{label}: {exc}")
            refusals: list[str] = []
            reports: dict[int, health_gate.HealthReport] = {}
            gate = self._gate(spec, check_latency, refusals, reports)
            self._crash.reached("load")
            try:
                tuned = self.loader.load(spec, self._store.path_for(role.sha256), sample, gate,
                                         sha256=role.sha256)
            except NoRuntimeError as exc:
                if refusals:
                    return give_up("health", f"{what} failed its health check: "
                                   f"{'; '.join(refusals)}", exc.attempts)
                return give_up("load", f"{what}: {exc}", exc.attempts)
            except ValueError as exc:  # an unknown runtime in the preference list
                return give_up("load", f"{what}: {exc}")
            loaded[role.role] = RoleLoaded(role, tuned)
            latency = reports[id(tuned.session)].latency_ms
            if latency is not None:
                latencies[role.role] = latency
        served = self.loader.serving_roles(spec, loaded)
        model = served.model
        model.model_dir = model_dir
        try:
            # Built now, not on the first job: settings or characters that do not fit the
            # models refuse the version while the old one keeps serving.
            model.pipeline()
        except JobError as exc:
            model.retire()  # closes every session
            return self._failed_to(spec, "pipeline", exc.message)
        refused = self._over_budget(spec, model, used_before)
        if refused is not None:
            return self._failed_to(spec, "memory", refused)
        self._announce_serving(
            spec, served, latencies.get(roles[0].role),
            roles={role: RoleServing(runtime=r.tuned.session.runtime,
                                     device=r.tuned.session.device,
                                     precision=r.tuned.choice.precision,
                                     latency_ms=(None if role not in latencies
                                                 else round(latencies[role], 3)))
                   for role, r in loaded.items()},
        )
        log.info("%s serving: %s", label, ", ".join(
            f"{role} on {r.tuned.session.runtime}/{r.tuned.session.device}"
            for role, r in loaded.items()))
        return model, None

    def failed_over(self, old: ServingModel, new: ServingModel, choice: Choice,
                     reason: str) -> None:
        """agent/failover.py swapped `new` in for `old`: report the runtime now serving."""
        with self._lock:
            status = self._statuses.get(old.spec.key)
            if status is not None:
                before = status.failovers if isinstance(status.failovers, list) else []
                self._statuses[old.spec.key] = msgspec.structs.replace(
                    status, runtime=new.session.runtime, device=new.session.device,
                    attempts=attempt_reports(new.attempts), precision=choice.precision,
                    failovers=[*before, failover_record(old, new, reason)])
        self._on_change()

    def _failed_to(
        self, spec: ModelSpec, stage: str, reason: str, attempts: list[Attempt] | None = None,
        cause: str | None = None,
    ) -> tuple[None, str]:
        """`cause`: an artifact's ArtifactError.cause ("deadline", ...), put in the event."""
        self._failed[spec.key] = version_dir_name(spec)
        self.set_status(
            ModelEntry(spec.name, spec.version, spec.sha256, "failed", error=reason,
                       attempts=attempt_reports(attempts or []))
        )
        self._emit("model_failed", model=spec.name, version=spec.version, stage=stage,
                   message=reason, **({"cause": cause} if cause else {}))
        log.error("%s", reason)
        return None, reason
