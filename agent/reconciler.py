"""Desired state in, serving models out.

The reconciler runs on its own thread. It takes the newest desired manifest
(older ones not yet started are superseded), checks it is one this agent may accept
(agent.verifier: signature, rollback, expiry), fetches, verifies, loads and warms
each new model version, puts it through the health gate (agent/bring_up.py does
each version), and swaps the set in only then. A version that fails never replaces a serving one. What is
serving is written to `applied.json` (agent/applied.py) so a restarted agent serves
it again from its store before the broker answers.

A slow artifact never holds the next manifest back: downloads run on a thread of
their own while this one watches the mailbox. A newer manifest that this agent
accepts cuts the download (agent.store.DownloadCut), abandons the manifest being
applied (`deploy_superseded`; what serves keeps serving) and is applied at once.
One that is refused is reported and the download goes on.

The local model folder (`models.local_dir`, agent/local_models.py) is a second source:
its scans come through `offer_local`, and every apply brings up the fleet manifest's
models and the folder's together, through the same fetch, verification, health gate and
swap. A name in both is the manifest's; the folder's is refused and reported. Only the
manifest's models go to `applied.json`: the folder's are read again from the folder.

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
from collections.abc import Callable
from pathlib import Path

import msgspec

from edgeinfer.agent import faults
from edgeinfer.agent.applied import AppliedFile, AppliedUnreadable
from edgeinfer.agent.bring_up import EmitEvent, VersionBringUp
from edgeinfer.agent.config import AgentConfig
from edgeinfer.agent.failover import FailoverManager
from edgeinfer.agent.local_models import LocalScan, Refusal, Refusals, split_conflicts
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.agent.store import ArtifactError, DownloadCut, ModelStore
from edgeinfer.agent.trust import load_trusted_keys
from edgeinfer.agent.verifier import ManifestVerifier
from edgeinfer.contract.documents import ModelEntry
from edgeinfer.contract.manifest import Manifest, ManifestError, ModelSpec, Published, decode_published
from edgeinfer.runtimes.hardware import HardwareInfo

log = logging.getLogger(__name__)


class _RevisionOnly(msgspec.Struct):
    revision: int | None = None


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
        self._emit = emit_event
        self._on_change = on_change
        self._applied = AppliedFile(cfg.state_path)
        self.applied_revision: int | None = None
        self.applied_digest: str | None = None
        self.applied_rollback = False
        self.last_error: str | None = None
        self._last_manifest: Manifest | None = None
        self._mailbox: bytes | None = None
        # The local folder: its newest scan not yet taken, the one applied, the fleet's
        # models restored from applied.json (until a manifest comes), refusals reported.
        self._local_mailbox: LocalScan | None = None
        self._local: LocalScan | None = None
        self._restored: list[ModelSpec] = []
        self._inputs: tuple[object, LocalScan | None] | None = None
        self._refusals = Refusals(emit_event)
        # The last refused manifest's error: kept in last_error by the folder's applies.
        self._manifest_error: str | None = None
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
        self.versions = VersionBringUp(cfg, store, registry, hardware, emit_event, on_change,
                                       self._fetch, self._crash, self.swap_lock)

    def statuses(self) -> list[ModelEntry]:
        """Each version's entry in `reported.models` (any thread)."""
        return self.versions.statuses()

    @property
    def failover(self) -> FailoverManager:
        """Demotes a serving runtime that keeps failing; the scheduler tells it each run's
        outcome (its RunObserver)."""
        return self.versions.loader.failover

    # --- thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()
        self.failover.start()
        self.versions.cache.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.failover.stop(timeout)
        self.versions.cache.stop(timeout)

    def offer(self, payload: bytes) -> None:
        """Hand over a desired-state payload (network thread: never blocks)."""
        with self._wake:
            self._mailbox = payload
            self._wake.notify()

    def offer_local(self, scan: LocalScan) -> None:
        """Hand over the local folder's newest scan (its watcher's thread: never blocks)."""
        with self._wake:
            self._local_mailbox = scan
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._mailbox is None and self._local_mailbox is None and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                payload, self._mailbox = self._mailbox, None
                local, self._local_mailbox = self._local_mailbox, None
            try:
                if local is not None:
                    self._local = local
                if payload is not None:
                    self.apply_payload(payload)
                if local is not None:
                    self.apply_local()
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
        self.last_error = self._manifest_error = f"{which} refused ({exc.reason}): {exc}"
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

    def apply_local(self) -> None:
        """Apply the local folder's scan beside the fleet's models as they stand."""
        if self._inputs == (self._fleet_source(), self._local):
            return
        with self.swap_lock:
            self._apply(None, None)

    def serve_local(self, scan: LocalScan) -> None:
        """Apply a scan of the local folder now (at start, before this thread runs)."""
        self._local = scan
        self.apply_local()

    def _fleet_source(self) -> object:
        return self._last_manifest if self._last_manifest is not None else self._restored

    def _apply(self, manifest: Manifest | None, digest: str | None) -> None:
        """`manifest` None: the local folder changed, the fleet's models stay as they were
        (no deploy events; the applied revision stays)."""
        self.reconcile_count += 1
        started = time.monotonic()
        inputs = (manifest or self._fleet_source(), self._local)
        fleet = (manifest.models if manifest is not None else self._last_manifest.models
                 if self._last_manifest is not None else self._restored)
        local, refused = split_conflicts(self._local, {spec.name for spec in fleet},
                                         self.applied_revision if manifest is None
                                         else manifest.revision)
        rollback = {"rollback": True} if manifest is not None and manifest.rollback else {}
        if manifest is not None:
            self._emit("deploy_started", revision=manifest.revision, **rollback)
        chosen: list[ServingModel] = []
        failures: list[str] = []
        loaded_names: set[str] = set()
        tried: set[tuple[str, str]] = set()
        before = {id(m) for m in self._registry.snapshot()}
        # The fleet's models, then each local name's versions newest first until one serves.
        queue = [(spec, None) for spec in fleet] + [
            (v.spec, v.folder) for versions in local.values() for v in versions]
        for spec, folder in queue:
            if folder is not None and spec.name in loaded_names:
                continue  # a newer local version of this name serves
            tried.add(spec.key)
            try:
                model, error = self.versions.bring_up(spec)
            except _Superseded as exc:
                assert manifest is not None  # only a manifest's apply is superseded
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
            elif error is not None and folder is None:
                failures.append(error)
            elif error is not None and folder is not None:
                refused.append(Refusal(folder, f"{folder}: {error}", spec.name, spec.version,
                                       reason="load"))
        wanted_names = {spec.name for spec in fleet} | set(local)
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
        self.versions.keep_statuses(tried | serving_keys)
        done = manifest is not None and not failures  # the applied revision advances
        self._applied.write(
            (m.spec for m in chosen if m.spec.name not in local),
            manifest.revision if done and manifest else self.applied_revision,
            digest if done else self.applied_digest,
            manifest.rollback if done and manifest else self.applied_rollback,
            before_replace=(lambda: self._crash.reached("swap")) if changed else None,
        )
        if changed:
            self._crash.reached("cleanup")
        self._store.remove_unreferenced(m.spec for m in chosen)
        if done and manifest is not None:
            self.applied_revision = manifest.revision
            self.applied_digest = digest
            self.applied_rollback = manifest.rollback
        self._refusals.report(refused)
        self._inputs = inputs
        if manifest is not None:
            self._manifest_error = None
        self.last_error = "; ".join([*([self._manifest_error] if self._manifest_error else []),
                                     *failures, *(r.message for r in refused)]) or None
        if manifest is None:
            self._on_change()
            return
        self._last_manifest = manifest
        self._emit(
            "deploy_finished" if not failures else "deploy_failed",
            revision=manifest.revision,
            seconds=round(time.monotonic() - started, 3),
            message="; ".join(failures) or None,
            **rollback,
        )
        self._on_change()

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

    def restore(self) -> int:
        """Serve what was applied before the restart, from the store. Returns models loaded.

        A version restored here passed its health gate when it was deployed; its latency
        budget is not measured again while the gateway is busy starting up.
        """
        try:
            applied = self._applied.read()
        except AppliedUnreadable as exc:
            self.last_error = f"{exc}; waiting for desired state"
            log.error("%s", self.last_error)
            return 0
        if applied is None:
            return 0
        chosen: list[ServingModel] = []
        for spec in applied.models:
            if not self._store.has(spec):
                log.warning("%s:%s missing from the store", spec.name, spec.version)
                continue
            model, _ = self.versions.bring_up(spec, check_latency=False)
            if model is not None:
                chosen.append(model)
        self._registry.replace(chosen)
        self._restored = list(applied.models)
        self.applied_revision = applied.revision
        self.applied_digest = applied.digest
        self.applied_rollback = applied.rollback
        log.info("restored %d model(s) from %s", len(chosen), self._store.root)
        return len(chosen)
