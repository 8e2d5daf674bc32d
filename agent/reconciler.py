"""Desired state in, serving models out.

The reconciler runs on its own thread. It takes the newest desired manifest
(older ones not yet started are superseded), checks it is one this agent may accept
(agent.verifier: signature, rollback, expiry), fetches, verifies, loads and warms
each new model version, puts it through the health gate (agent.health), and swaps
the set in only then. A version that fails never replaces a serving one. What is
serving is written to `applied.json` so a restarted agent serves it again from its
store before the broker answers.

A slow artifact never holds the next manifest back: downloads run on a thread of
their own while this one watches the mailbox. A newer manifest that this agent
accepts cuts the download (agent.store.DownloadCut), abandons the manifest being
applied (`deploy_superseded`; what serves keeps serving) and is applied at once.
One that is refused is reported and the download goes on.

Crash safety: the artifact store only ever holds complete, verified files; the
swap in memory is followed by one atomic rename of `applied.json`, so a process
killed at any moment restarts serving the old set or the new one, and `restore`
removes what a killed write left behind.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from edgeinfer.agent import faults, health_gate
from edgeinfer.agent.config import AgentConfig
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
from edgeinfer.agent.store import (
    ArtifactError,
    DownloadCut,
    ModelStore,
    atomic_write,
    remove_stale_temps,
    version_dir_name,
)
from edgeinfer.agent.trust import load_trusted_keys
from edgeinfer.agent.verifier import ManifestVerifier
from edgeinfer.contract.documents import ModelEntry, RoleServing
from edgeinfer.contract.errors import JobError
from edgeinfer.contract.manifest import (
    Manifest,
    ManifestError,
    ModelSpec,
    Published,
    RoleModel,
    decode_published,
    model_roles,
)
from edgeinfer.runtimes.autotune import Choice
from edgeinfer.runtimes.base import Session
from edgeinfer.runtimes.hardware import HardwareInfo
from edgeinfer.runtimes.selection import Attempt, NoRuntimeError, WarmupCheck

log = logging.getLogger(__name__)

EmitEvent = Callable[..., None]
APPLIED_FILE = "applied.json"


class _RevisionOnly(msgspec.Struct):
    revision: int | None = None


class Applied(msgspec.Struct, forbid_unknown_fields=True):
    """What this agent serves, as written to disk after each reconcile."""

    revision: int | None
    models: list[ModelSpec]
    # Published.digest of the applied revision's manifest (None in files written before
    # it was kept): the same revision with other content is then told apart.
    digest: str | None = None
    # The applied revision's manifest said `"rollback": true` (in `reported`).
    rollback: bool = False


class _Superseded(Exception):
    """A newer accepted manifest arrived while this one was being applied."""

    def __init__(self, newer: Published) -> None:
        super().__init__(f"superseded by revision {newer.manifest.revision}")
        self.newer = newer


# A download that outlives its own deadline by this much (blocked where no cut reaches,
# e.g. a TLS handshake or a name lookup) is abandoned: its thread is left to end alone.
_ABANDON_AFTER_S = 2.0
# How long a cut download gets to end before it is abandoned likewise.
_CUT_GRACE_S = 5.0


class Reconciler:
    def __init__(
        self,
        cfg: AgentConfig,
        store: ModelStore,
        registry: ServedModels,
        hardware: HardwareInfo,
        emit_event: EmitEvent,
        on_change: Callable[[], None],
    ) -> None:
        self._cfg = cfg
        self._store = store
        self._registry = registry
        self._hw = hardware
        self._emit = emit_event
        self._on_change = on_change
        self._applied_path = cfg.state_path / APPLIED_FILE
        self._lock = threading.Lock()
        # Each version's entry in `reported.models`, by (name, version).
        self._statuses: dict[tuple[str, str], ModelEntry] = {}
        self.applied_revision: int | None = None
        self.applied_digest: str | None = None
        self.applied_rollback = False
        self.last_error: str | None = None
        # A failed (name, version) is not retried until the manifest changes its files
        # (by version_dir_name: the artifact's sha256 and those of its files).
        self._failed: dict[tuple[str, str], str] = {}
        self._last_manifest: Manifest | None = None
        self._mailbox: bytes | None = None
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.reconcile_count = 0
        self.verifier = ManifestVerifier(load_trusted_keys(cfg.trust),
                                         allow_rollback=cfg.deploy.allow_rollback)
        # The manifest apply() is applying: a download then watches the mailbox for a newer one.
        self._applying: Manifest | None = None
        # Test hook only (agent/faults.py): read once, here.
        self._crash = faults.CrashPoint(faults.crash_stage_from_env())
        # Held while a manifest is applied, and by a failover's swap (agent/failover.py).
        self.swap_lock = threading.RLock()
        self.loader = ModelLoader(cfg, hardware, store, registry, emit_event, self._failed_over,
                                  self.swap_lock)

    # --- status, read by the service for `reported` --------------------------------------

    def statuses(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._statuses.values())

    def _set_status(self, status: ModelEntry) -> None:
        with self._lock:
            self._statuses[(status.name, status.version)] = status

    # --- thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()
        self.loader.failover.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.loader.failover.stop(timeout)

    def offer(self, payload: bytes) -> None:
        """Hand over a desired-state payload (network thread: never blocks)."""
        with self._wake:
            self._mailbox = payload
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._mailbox is None and not self._stop:
                    self._wake.wait()
                if self._stop or self._mailbox is None:
                    return
                payload: bytes = self._mailbox
                self._mailbox = None
            try:
                self.apply_payload(payload)
            except Exception as exc:
                log.exception("reconcile failed")
                self.last_error = f"reconcile failed: {exc}"
                self._emit("reconcile_failed", message=self.last_error)
                self._on_change()

    # --- reconciling ---------------------------------------------------------------------

    def apply_payload(self, payload: bytes) -> None:
        published = self._screen(payload)
        while published is not None:
            try:
                self.apply(published.manifest, published.digest)
                return
            except _Superseded as newer:
                published = newer.newer

    def _screen(self, payload: bytes) -> Published | None:
        """The payload as a manifest this agent may apply, or None (refusals reported)."""
        if not payload:
            log.info("desired state is empty (retained message cleared); nothing to do")
            return None
        try:
            published = decode_published(payload)
            self.verifier.check(published, self.applied_revision, self.applied_digest)
        except ManifestError as exc:
            self._reject(exc, payload)
            return None
        return published

    def _reject(self, exc: ManifestError, payload: bytes) -> None:
        """A refused manifest changes nothing: what serves keeps serving."""
        revision = None
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            revision = msgspec.json.decode(payload, type=_RevisionOnly).revision
        # `edge-fleet deploy --wait` looks for "manifest revision N refused" here.
        which = "manifest" if revision is None else f"manifest revision {revision}"
        self.last_error = f"{which} refused ({exc.reason}): {exc}"
        log.warning("%s", self.last_error)
        self._emit("manifest_rejected", reason=exc.reason, message=str(exc), revision=revision)
        self._on_change()

    def apply(self, manifest: Manifest, digest: str | None = None) -> None:
        """Apply `manifest` (`digest`: its Published.digest). Raises _Superseded, having
        changed nothing that serves, when a newer accepted manifest arrives meanwhile."""
        if manifest == self._last_manifest:
            log.debug("manifest revision %s unchanged; nothing to do", manifest.revision)
            return
        self._crash.live = True
        self._applying = manifest
        try:
            with self.swap_lock:
                self._apply(manifest, digest)
        finally:
            self._crash.live = False
            self._applying = None

    def _apply(self, manifest: Manifest, digest: str | None) -> None:
        self.reconcile_count += 1
        started = time.monotonic()
        rollback = {"rollback": True} if manifest.rollback else {}
        self._emit("deploy_started", revision=manifest.revision, **rollback)
        chosen: list[ServingModel] = []
        failures: list[str] = []
        loaded_names: set[str] = set()
        before = {id(m) for m in self._registry.snapshot()}
        for spec in manifest.models:
            try:
                model, error = self._bring_up(spec)
            except _Superseded as exc:
                for new in chosen:
                    if id(new) not in before:
                        new.retire()  # loaded for this manifest, never served
                self._emit(
                    "deploy_superseded", revision=manifest.revision,
                    by=exc.newer.manifest.revision, model=spec.name, version=spec.version,
                    seconds=round(time.monotonic() - started, 3),
                    message=(f"revision {manifest.revision} abandoned while fetching "
                             f"{spec.name}:{spec.version}: revision "
                             f"{exc.newer.manifest.revision} arrived; what served keeps "
                             "serving"))
                self._on_change()
                raise
            if model is not None:
                chosen.append(model)
                loaded_names.add(spec.name)
            elif error is not None:
                failures.append(error)
        wanted_names = {spec.name for spec in manifest.models}
        # A name whose new versions all failed keeps serving what it served.
        for old in self._registry.snapshot():
            if old.spec.name in wanted_names and old.spec.name not in loaded_names:
                chosen.append(old)
                self._emit(
                    "kept_serving",
                    model=old.spec.name,
                    version=old.spec.version,
                    message=f"{old.label} keeps serving: no new version of it could be loaded",
                )
        changed = any(id(m) not in before for m in chosen)
        # Jobs in flight on a dropped model finish on it (ServingModel.retire).
        dropped = self._registry.replace(chosen)
        serving_keys = {m.spec.key for m in chosen}
        for m in dropped:
            self._emit("model_unloaded", model=m.spec.name, version=m.spec.version)
        with self._lock:
            wanted_keys = {spec.key for spec in manifest.models}
            self._statuses = {
                k: s for k, s in self._statuses.items() if k in wanted_keys or k in serving_keys
            }
        self._persist(
            chosen,
            manifest.revision if not failures else self.applied_revision,
            digest if not failures else self.applied_digest,
            manifest.rollback if not failures else self.applied_rollback,
            before_replace=(lambda: self._crash.reached("swap")) if changed else None,
        )
        if changed:
            self._crash.reached("cleanup")
        self._store.remove_unreferenced(m.spec for m in chosen)
        if failures:
            self.last_error = "; ".join(failures)
        else:
            self.applied_revision = manifest.revision
            self.applied_digest = digest
            self.applied_rollback = manifest.rollback
            self.last_error = None
        self._last_manifest = manifest
        self._emit(
            "deploy_finished" if not failures else "deploy_failed",
            revision=manifest.revision,
            seconds=round(time.monotonic() - started, 3),
            message=self.last_error,
            **rollback,
        )
        self._on_change()

    def _bring_up(
        self, spec: ModelSpec, *, check_latency: bool = True
    ) -> tuple[ServingModel | None, str | None]:
        """Return (model, None) when it serves, (None, reason) when it failed."""
        current = self._registry.find(spec.name, spec.version)
        if current is not None and version_dir_name(current.spec) == version_dir_name(spec):
            return current, None
        if self._failed.get(spec.key) == version_dir_name(spec):
            status = self._statuses.get(spec.key)
            return None, (status.error if status and status.error else f"{spec.name} failed")
        self._set_status(ModelEntry(spec.name, spec.version, spec.sha256, "loading"))
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
        refusals: list[str] = []
        reports: dict[int, health_gate.HealthReport] = {}  # by id(session): auto judges several
        gate = self._gate(spec, check_latency, refusals, reports)
        self._crash.reached("load")
        try:
            # ["auto"] (the default) tunes over every runtime; a list pins an order.
            loaded = self.loader.load(spec, path, warmup_inputs, gate)
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
        self._announce_serving(spec, served, reports[id(session)].latency_ms)
        log.info("%s serving on %s/%s", label, session.runtime, session.device)
        return served.model, None

    def _fetch(self, spec: ModelSpec) -> Path:
        """The spec's artifact and files, fetched and verified on a thread of their own.

        Meanwhile this thread keeps reading the mailbox: a newer manifest this agent
        accepts cuts the download and raises _Superseded; a refused one is reported and
        the download goes on. A download blocked past its deadline where the cut does not
        reach is abandoned (ArtifactError, cause "deadline").
        """
        deploy = self._cfg.deploy
        cut = DownloadCut()
        done = threading.Event()
        outcome: list[Path | BaseException] = []

        def work() -> None:
            try:
                got = self._store.fetch(spec, deploy.download_timeout_s,
                                        deploy.max_artifact_bytes,
                                        checkpoint=self._crash.reached, cut=cut)
                self._store.fetch_files(spec, deploy.download_timeout_s,
                                        deploy.max_artifact_bytes, cut=cut)
                outcome.append(got)
            except BaseException as exc:  # handed to the reconciler's thread, raised there
                outcome.append(exc)
            finally:
                done.set()
                with self._wake:
                    self._wake.notify_all()

        worker = threading.Thread(target=work, name=f"fetch {spec.name}:{spec.version}",
                                  daemon=True)
        worker.start()
        while not done.is_set():
            with self._wake:
                applying = self._applying is not None  # not while restoring
                if not done.is_set() and (self._mailbox is None or not applying):
                    self._wake.wait(0.5)
                payload, self._mailbox = (
                    (self._mailbox, None) if applying else (None, self._mailbox))
            if self._stop and not cut.fired:
                cut.fire("the agent is stopping")  # the download ends; stop() joins us
            if payload is not None:
                newer = self._screen(payload)
                # The same manifest delivered again (a reconnect) lets the download go on.
                if newer is not None and newer.manifest != self._applying:
                    cut.fire("superseded")
                    done.wait(_CUT_GRACE_S)
                    raise _Superseded(newer)
            if cut.deadline is not None and not done.is_set() and (
                    time.monotonic() > cut.deadline + _ABANDON_AFTER_S):
                cut.fire("deadline")
                if not done.wait(_CUT_GRACE_S):
                    log.warning("abandoned the download of %s:%s: it ignored its deadline",
                                spec.name, spec.version)
                    raise ArtifactError(
                        f"download of {spec.name}:{spec.version} from {spec.uri} did not "
                        f"finish within deploy.download_timeout_s="
                        f"{deploy.download_timeout_s:g}s", "deadline")
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _announce_serving(self, spec: ModelSpec, served: Serving, latency_ms: float | None,
                          **event: Any) -> None:
        """A version now serves: its status in `reported` and the `model_serving` event
        (a multi-model version's runtime fields are its first model's; `event` adds fields)."""
        tuned = served.tuned
        session = tuned.session
        self._failed.pop(spec.key, None)
        self._set_status(served.entry(spec))
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

    def _failed_over(self, old: ServingModel, new: ServingModel, choice: Choice,
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
        self._set_status(
            ModelEntry(spec.name, spec.version, spec.sha256, "failed", error=reason,
                       attempts=attempt_reports(attempts or []))
        )
        self._emit("model_failed", model=spec.name, version=spec.version, stage=stage,
                   message=reason, **({"cause": cause} if cause else {}))
        log.error("%s", reason)
        return None, reason

    # --- disk ----------------------------------------------------------------------------

    def _persist(
        self, serving: list[ServingModel], revision: int | None, digest: str | None,
        rollback: bool, before_replace: Callable[[], None] | None = None,
    ) -> None:
        applied = Applied(revision=revision, models=[m.spec for m in serving], digest=digest,
                          rollback=rollback)
        atomic_write(self._applied_path, msgspec.json.encode(applied), before_replace)

    def restore(self) -> int:
        """Serve what was applied before the restart, from the store. Returns models loaded.

        A version restored here passed its health gate when it was deployed; its latency
        budget is not measured again while the gateway is busy starting up.
        """
        stale = remove_stale_temps(self._applied_path)
        if stale:
            log.info("removed %d unfinished write(s) of %s", stale, self._applied_path.name)
        try:
            raw = self._applied_path.read_bytes()
        except FileNotFoundError:
            return 0
        try:
            applied = msgspec.json.decode(raw, type=Applied)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.last_error = f"{self._applied_path} unreadable ({exc}); waiting for desired state"
            log.error("%s", self.last_error)
            return 0
        chosen: list[ServingModel] = []
        for spec in applied.models:
            if not self._store.has(spec):
                log.warning("%s:%s missing from the store", spec.name, spec.version)
                continue
            model, _ = self._bring_up(spec, check_latency=False)
            if model is not None:
                chosen.append(model)
        self._registry.replace(chosen)
        self.applied_revision = applied.revision
        self.applied_digest = applied.digest
        self.applied_rollback = applied.rollback
        log.info("restored %d model(s) from %s", len(chosen), self._store.root)
        return len(chosen)
