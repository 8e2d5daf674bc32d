"""The models being served, by name and version, safe to swap under load.

A job holds its model for the whole run (`ServedModels.use`); a model that a
deploy replaces is retired and closed only when its last job has finished, so
jobs in flight finish on the version they started on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from edgeinfer.contract.documents import TensorMetadata
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.contract.manifest import ModelSpec
from edgeinfer.contract.traffic import pick_version
from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.pipelines import Pipeline, build_pipeline
from edgeinfer.runtimes.selection import Attempt

log = logging.getLogger(__name__)


class LazyPlace(Protocol):
    """A `load: lazy` version's place in the model cache (agent/model_cache.py's `Lazy`),
    as the version and its jobs see it."""

    pinned: bool
    last_used: float

    def ensure(self, model: ServingModel, deadline: float | None) -> None:
        """Called by a job holding `model`: return once it is loaded (raises JobError)."""

    def released(self) -> None:
        """A job let go of the version."""


class ServingModel:
    """One served model version. A multi-model version (`ocr`: det, rec, cls) holds all its
    sessions by role in `sessions`, `session` being the first role's (what answers report as
    the runtime); they are swapped in, used and closed together."""

    def __init__(self, spec: ModelSpec, session: Session, attempts: list[Attempt],
                 sessions: Mapping[str, Session] | None = None) -> None:
        self.spec = spec
        self.session = session
        self.attempts = attempts
        self.sessions: dict[str, Session] | None = None if sessions is None else dict(sessions)
        self._lock = threading.Lock()
        self._inflight = 0
        self._retired = False
        self._closed = False
        self.model_dir: Path | None = None  # the version's folder, with its side files
        self._pipeline: Pipeline | None = None
        self._pipeline_error: str | None = None
        # The manifest's `instances`: jobs (or batches) that run on the session at once.
        # The session's threads were sized for that many (runtimes.base.LoadOptions).
        self.instances = threading.BoundedSemaphore(spec.instances)
        # The model cache (agent/model_cache.py): the agent's memory growth over this version's
        # load and warm-up (MB; None until measured), and for a `load: lazy` version its
        # place in the cache (None: eager, always loaded; the one check on a job's path).
        self.memory_mb: float | None = None
        self.lazy: LazyPlace | None = None
        self._unloaded = False  # its sessions closed by the cache; reloaded on demand
        self._described: tuple[list[TensorSpec], list[TensorSpec]] | None = None

    @property
    def pipeline_session(self) -> Session | Mapping[str, Session]:
        """What the pipeline runs on: the role -> Session mapping of a multi-model version,
        else the one session."""
        return self.session if self.sessions is None else self.sessions

    def pipeline(self) -> Pipeline | None:
        """The task pipeline (None for `tensor`), built on first use; raises JobError."""
        if self.spec.task == "tensor":
            return None
        with self._lock:
            if self._pipeline is None and self._pipeline_error is None:
                try:
                    self._pipeline = build_pipeline(
                        self.spec.task, self.spec.settings, self.model_dir, self.pipeline_session
                    )
                except ValueError as exc:
                    self._pipeline_error = f"model {self.label}: {exc}"
            if self._pipeline_error is not None:
                raise JobError(Code.UNAVAILABLE, self._pipeline_error)
            return self._pipeline

    def tensors(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """What a job sends and what its answer holds: the task pipeline's tensors when the
        task has one, else the session's. Raises JobError when the pipeline cannot be built."""
        if self._described is not None:  # kept: an unloaded lazy version has no session
            return self._described
        pipeline = self.pipeline()
        if pipeline is None:
            described = self.session.inputs, self.session.outputs
        else:
            described = pipeline.inputs(), pipeline.outputs()
        self._described = described
        return described

    @property
    def label(self) -> str:
        return f"{self.spec.name}:{self.spec.version}"

    def _enter(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        """The job that acquired this model is done with it."""
        with self._lock:
            self._inflight -= 1
            close = self._retired and self._inflight == 0
        if close:
            self._close()
        if self.lazy is not None:
            self.lazy.released()

    # --- the model cache's side (agent/model_cache.py) -----------------------------------

    @property
    def loaded(self) -> bool:
        return not self._unloaded

    @property
    def inflight(self) -> int:
        """Jobs holding this version now."""
        return self._inflight

    def detach(self) -> list[Session] | None:
        """Mark this version unloaded, if no job holds it and it is loaded and not closed;
        the sessions to close (by the caller, outside any lock), else None."""
        with self._lock:
            if self._inflight or self._closed or self._unloaded:
                return None
            self._unloaded = True
            self._pipeline = None
            self._pipeline_error = None
            return self._all_sessions()

    def install(self, session: Session) -> None:
        """A reloaded session (a single-model version) takes the closed one's place; the
        pipeline is built again on it."""
        with self._lock:
            self.session = session
            self._pipeline = None
            self._pipeline_error = None
            self._unloaded = False

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._inflight == 0
        if close:
            self._close()

    def _all_sessions(self) -> list[Session]:
        sessions = [self.session] if self.sessions is None else list(self.sessions.values())
        if all(s is not self.session for s in sessions):
            sessions.append(self.session)
        return sessions

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Unloaded by the cache: its sessions are closed already.
            sessions = [] if self._unloaded else self._all_sessions()
        for session in sessions:
            try:
                session.close()
            except Exception:
                log.exception("closing %s failed", self.label)


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[TensorMetadata]:
    """Tensors as `reported` and OIP's model metadata list them."""
    return [TensorMetadata(s.name, s.datatype, list(s.shape)) for s in specs]


def _unnamed(versions: list[ServingModel], split_key: str | None) -> ServingModel:
    """The version a job naming none runs on: by `traffic` weight from `split_key` when the
    name's serving versions give weights, else the last serving version; never a shadow."""
    if len(versions) == 1:  # the common case, on every job's path: nothing to choose
        return versions[0]
    serving = [m for m in versions if not m.spec.shadow] or versions
    weighted = [(m.spec.version, m.spec.traffic) for m in serving if m.spec.traffic is not None]
    if len(weighted) == len(serving) > 1 and split_key is not None:
        chosen = pick_version(weighted, split_key)
        for m in serving:
            if m.spec.version == chosen:
                return m
    return serving[-1]


class ServedModels:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> versions in manifest order; the last one answers jobs that name no version.
        self._by_name: dict[str, list[ServingModel]] = {}
        # name -> its shadow version (manifest `shadow`), only for names that have one:
        # replaced whole (never changed in place), so read without the lock.
        self._shadows: dict[str, ServingModel] = {}

    def shadow_of(self, name: str) -> ServingModel | None:
        """The shadow version of `name`, if one serves. On every run's path: with no shadow
        anywhere it costs one truthiness test of an empty dict."""
        shadows = self._shadows
        return shadows.get(name) if shadows else None

    def snapshot(self) -> list[ServingModel]:
        with self._lock:
            return [m for versions in self._by_name.values() for m in versions]

    def find(self, name: str, version: str) -> ServingModel | None:
        with self._lock:
            for m in self._by_name.get(name, ()):
                if m.spec.version == version:
                    return m
        return None

    def replace(self, models: Iterable[ServingModel]) -> list[ServingModel]:
        """Serve exactly `models` from now on; retire and return the ones dropped."""
        fresh: dict[str, list[ServingModel]] = {}
        for m in models:
            fresh.setdefault(m.spec.name, []).append(m)
        keep_ids = {id(m) for versions in fresh.values() for m in versions}
        # Rebuilt here, after a deploy set each kept version's `shadow` (bring_up._reweigh).
        shadows = {m.spec.name: m for versions in fresh.values() for m in versions
                   if m.spec.shadow}
        with self._lock:
            old = [m for versions in self._by_name.values() for m in versions]
            self._by_name = fresh
            self._shadows = shadows
        dropped = [m for m in old if id(m) not in keep_ids]
        for m in dropped:
            m.retire()
        return dropped

    def lookup(self, name: str, version: str | None) -> tuple[ServingModel, list[str]]:
        """The version a job naming `version` (None: none) would run on, without holding
        it, and every version of `name` served (the one a job naming none gets last);
        raises JobError(NOT_FOUND) as `acquire` does."""
        with self._lock:
            return self._lookup(name, version), [m.spec.version for m in self._by_name[name]]

    def _lookup(self, name: str, version: str | None,
                split_key: str | None = None) -> ServingModel:
        versions = self._by_name.get(name)
        if not versions:
            served = ", ".join(sorted(self._by_name)) or "none"
            raise JobError(Code.NOT_FOUND, f"model {name!r} is not served here (serving: {served})")
        if version is None:
            return _unnamed(versions, split_key)
        for m in versions:
            if m.spec.version == version:
                return m
        have = ", ".join(m.spec.version for m in versions)
        raise JobError(
            Code.NOT_FOUND, f"model {name!r} has no version {version!r} here (versions: {have})"
        )

    def acquire(self, name: str, version: str | None,
                split_key: str | None = None) -> ServingModel:
        """Hold a model for one job until `release()`; raises JobError(NOT_FOUND).
        `split_key` (the job's id, else its key) picks among A/B versions (`traffic`)."""
        while True:
            with self._lock:
                model = self._lookup(name, version, split_key)
            if model._enter():
                return model
            # Retired between lookup and enter: the registry already holds its successor.

    @contextmanager
    def use(self, name: str, version: str | None) -> Iterator[ServingModel]:
        model = self.acquire(name, version)
        try:
            yield model
        finally:
            model.release()

    def close_all(self) -> None:
        for m in self.replace(()):
            m.retire()
