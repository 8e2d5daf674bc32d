"""Deploys: read a device's desired manifest, change one model, publish the next revision.

The manifest is read-modify-written: the retained `desired` is the only record of what a
device must serve, so other models in it are kept as they are. `ReportWatcher` then
follows the retained `reported` until the agent serves the new version or gives up.
"""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as paho

from edgeinfer.contract import lenient
from edgeinfer.contract.documents import ModelEntry, Reported
from edgeinfer.contract.manifest import (
    Manifest,
    ManifestError,
    ModelSpec,
    check_model,
    decode_manifest,
    encode_manifest,
)
from edgeinfer.contract.topics import NAME_RE, Topics
from edgeinfer.fleet.abtest import VersionsError, name_versions
from edgeinfer.fleet.artifacts import Artifact, ArtifactStore, artifact_url
from edgeinfer.fleet.models import file_digest
from edgeinfer.fleet.mqtt import BrokerError, Connection
from edgeinfer.fleet.reports import attempts_text, device_state, read_reported
from edgeinfer.fleet.signing import Signer
from edgeinfer.structcheck import StructError, convert


class DeployError(Exception):
    """A deploy that cannot go on; the message says what to do."""


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(what: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{what} {value!r} must match {NAME_RE.pattern}")
    return value


def parse_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "mqtt" and not parts.netloc and parts.path in ("", "/"):
        return "mqtt://"  # chunks over the device's own broker (fleet/chunk_server.py)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"artifact base URL {url!r} must look like http://host:port "
                         "(or be mqtt:// for chunks over the device's broker)")
    return url.rstrip("/")


def store_artifact(src: Path, store: ArtifactStore) -> Artifact:
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    artifact = store.put_file(src)
    if artifact.size == 0:
        raise ValueError(f"{src} is empty")
    return artifact


def plan_artifact(src: Path, store: ArtifactStore) -> Artifact:
    """What store_artifact(src, store) will store, read without writing anything: a deploy
    checks its whole manifest entry before the store gets a byte."""
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    sha256, size = file_digest(src)
    if size == 0:
        raise ValueError(f"{src} is empty")
    return Artifact(sha256, size, store.path_for(sha256))


def artifact_uri(artifact: Artifact, base_url: str | None) -> str:
    """`http://.../artifacts/sha256/<hex>` with a base URL, else the stored file's URI."""
    if base_url == "mqtt://":
        return f"mqtt:///artifacts/sha256/{artifact.sha256}"
    if base_url:
        return artifact_url(base_url, artifact.sha256)
    return artifact.path.resolve().as_uri()


def model_spec(
    *,
    name: str,
    version: str,
    artifact: Artifact,
    uri: str,
    task: str = "tensor",
    prefer: Sequence[str] | None = None,
    max_batch: int | None = None,
    max_delay_ms: float | None = None,
    instances: int | None = None,
    health: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    files: Sequence[tuple[str, Artifact, str]] = (),
) -> ModelSpec:
    """A validated manifest entry; raises ValueError naming the bad field.

    `health` is the entry's health gate as JSON (agent.manifest.Health).
    """
    check_name("model name", name)
    check_name("version", version)
    check_name("task", task)
    entry: dict[str, Any] = {
        "name": name, "version": version, "task": task, "uri": uri,
        "sha256": artifact.sha256, "size": artifact.size,
    }
    if prefer:
        entry["runtime"] = {"prefer": list(prefer)}
    batching: dict[str, Any] = {}
    if max_batch is not None:
        batching["max_batch"] = max_batch
    if max_delay_ms is not None:
        batching["max_delay_ms"] = max_delay_ms
    if batching:
        entry["batching"] = batching
    if instances is not None:
        entry["instances"] = instances
    if health is not None:
        entry["health"] = health
    if settings:
        entry["settings"] = settings
    if files:
        entry["files"] = [{"name": name, "uri": uri, "sha256": a.sha256, "size": a.size}
                          for name, a, uri in files]
    try:
        # convert() checks the constraints that plain construction would skip.
        spec = convert(entry, ModelSpec)
    except StructError as exc:
        raise ValueError(f"invalid model entry: {exc}") from None
    check_model(spec)  # what the agent checks too: e.g. the models an ocr version needs
    return spec


def next_manifest(
    current: Manifest | None,
    *,
    upsert: ModelSpec | None = None,
    remove: str | None = None,
    issued_at: str | None = None,
    applied: int | None = None,
    rollback: bool = False,
    versions: Sequence[ModelSpec] | None = None,
) -> Manifest:
    """The next revision: `upsert` replaces every entry of its name (by `versions` when
    given: several versions of the name at once, fleet/abtest.py), `remove` drops one.

    Revisions only move forward: the next one also passes `applied` (the device's
    reported revision), since an agent refuses a revision lower than the one it applied,
    e.g. after `desired` was cleared. A rollback is older content under the next
    revision, marked `rollback` on purpose. The old signature is dropped: it covered the
    old content.
    """
    models = list(current.models) if current else []
    if remove is not None:
        if not any(m.name == remove for m in models):
            listed = ", ".join(sorted({m.name for m in models})) or "none"
            raise DeployError(f"the desired manifest has no model {remove!r} (models: {listed})")
        models = [m for m in models if m.name != remove]
    if upsert is not None:
        models = [m for m in models if m.name != upsert.name] + list(versions or [upsert])
    manifest = Manifest(
        revision=max(current.revision if current else 0, applied or 0) + 1,
        models=models,
        issued_at=issued_at or utc_now(),
        rollback=rollback,
    )
    # What we publish must be what an agent accepts: round-trip through its decoder.
    try:
        return decode_manifest(encode_manifest(manifest))
    except ManifestError as exc:  # e.g. A/B weights that do not add up to 100
        raise DeployError(f"the next manifest would be refused: {exc}") from None


def read_current(conn: Connection, topics: Topics) -> tuple[Manifest | None, int | None]:
    """The device's retained desired manifest and its applied revision (None if absent)."""
    current, reported = _read_state(conn, topics)
    return current, reported.revision if reported else None


_VERSION_RE = re.compile(r"^v?(\d+(?:\.\d+)*)$")


def version_order(version: str) -> tuple[int, ...] | None:
    """"3", "v1.10.2" as numbers to compare; None for a version without that form."""
    m = _VERSION_RE.match(version)
    return None if m is None else tuple(int(part) for part in m.group(1).split("."))


def older_than_served(spec: ModelSpec, current: Manifest | None,
                      reported: Reported | Mapping[str, Any] | None) -> str | None:
    """The version of `spec.name` the device serves (else the one desired) when `spec`'s
    version is older than it, by version_order; None when it is not, or nobody can tell.
    `reported` may also be the document as decoded JSON."""
    if reported is not None and not isinstance(reported, Reported):
        reported = lenient.convert(reported, Reported)
    entry = reported.find_model(spec.name) if reported else None
    served = entry.version if entry and entry.state == "serving" else None
    if served is None:
        served = next((m.version for m in (current.models if current else [])
                       if m.name == spec.name), None)
    if served is None:
        return None
    new, old = version_order(spec.version), version_order(served)
    return served if new is not None and old is not None and new < old else None


def _read_state(conn: Connection, topics: Topics
                ) -> tuple[Manifest | None, Reported | None]:
    """The device's retained desired manifest and `reported` document (None if absent)."""
    got = conn.read_retained([topics.desired, topics.reported])
    reported = read_reported(got.get(topics.reported, b""))
    payload = got.get(topics.desired)
    if not payload:
        return None, reported
    try:
        return decode_manifest(payload), reported
    except ManifestError as exc:
        raise DeployError(
            f"the retained manifest on {topics.desired} is unusable ({exc}); "
            "fix or clear it before deploying"
        ) from None


def publish_desired(conn: Connection, topics: Topics, manifest: Manifest,
                    timeout_s: float = 5.0, signer: Signer | None = None) -> None:
    """Publish retained at QoS 1 (signed by `signer`, if given); wait for the PUBACK."""
    payload = signer.sign(manifest) if signer is not None else encode_manifest(manifest)
    fut = conn.publish(topics.desired, payload, qos=1, retain=True)
    try:
        fut.result(timeout_s)
    except TimeoutError:
        raise BrokerError(
            f"broker {conn.url} did not acknowledge the manifest within {timeout_s:g}s"
        ) from None


# -- following `reported` ---------------------------------------------------------


@dataclass(frozen=True)
class WaitResult:
    ok: bool
    message: str
    entry: dict[str, Any] | None = None  # the model's `reported` entry, as plain data


class ReportWatcher:
    """Follows a device's `reported` and `state`; subscribe before publishing.

    The first `reported` (retained) predates our manifest, so a failure in it is old
    news unless its revision already reaches ours; later messages are fresh.
    """

    def __init__(self, conn: Connection, topics: Topics) -> None:
        self.topics = topics
        self._conn = conn
        self._inbox: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.device_state: str | None = None
        self.last_entry: ModelEntry | None = None
        for topic in (topics.reported, topics.state):
            conn.subscribe(topic, self._on_message)

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        self._inbox.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def close(self) -> None:
        for topic in (self.topics.reported, self.topics.state):
            self._conn.unsubscribe(topic, timeout_s=1.0)

    def _next_report(self, deadline: float) -> tuple[Reported, bool] | None:
        """The next `reported` document and whether it is fresh, or None at the deadline."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                topic, payload, retained = self._inbox.get(timeout=left)
            except queue.Empty:
                return None
            if topic == self.topics.state:
                self.device_state = device_state(payload)
                continue
            doc = read_reported(payload)
            if doc is not None:
                return doc, retained
        return None

    def wait_serving(self, name: str, version: str, sha256: str, revision: int,
                     timeout_s: float, role: tuple[int | None, bool] | None = None
                     ) -> WaitResult:
        """`role`: the version's A/B (traffic, shadow) asked for; an entry that says
        otherwise is from before our manifest (the version served already)."""
        deadline = time.monotonic() + timeout_s
        while (got := self._next_report(deadline)) is not None:
            doc, retained = got
            if (refused := _refusal(doc, revision)) is not None:
                return refused
            entry = doc.find_model(name, version)
            if entry is None or entry.sha256 not in (None, sha256):
                continue
            traffic = None if isinstance(entry.traffic, msgspec.UnsetType) else entry.traffic
            if role is not None and role != (traffic, entry.shadow is True):
                continue
            self.last_entry = entry
            state = entry.state
            if state == "serving":
                return WaitResult(True, (
                    f"{name}:{version} is serving on {self.topics.device_id} via "
                    f"{entry.runtime}/{entry.device}"
                ), _plain(entry))
            fresh = not retained or _revision(doc) >= revision
            if state == "failed" and fresh:
                text = f"{name}:{version} failed on {self.topics.device_id}: {entry.error}"
                attempts = attempts_text(entry)
                return WaitResult(False, f"{text}\n{attempts}" if attempts else text,
                                  _plain(entry))
        return self._timed_out(f"serve {name}:{version}", timeout_s)

    def wait_removed(self, name: str, revision: int, timeout_s: float) -> WaitResult:
        deadline = time.monotonic() + timeout_s
        while (got := self._next_report(deadline)) is not None:
            doc, retained = got
            if (refused := _refusal(doc, revision)) is not None:
                return refused
            fresh = not retained or _revision(doc) >= revision
            if fresh and doc.find_model(name) is None:
                return WaitResult(True, f"{name} is no longer served on {self.topics.device_id}")
        return self._timed_out(f"stop serving {name}", timeout_s)

    def _timed_out(self, goal: str, timeout_s: float) -> WaitResult:
        seen = self.last_entry.state if self.last_entry else "nothing reported"
        return WaitResult(False, (
            f"timed out after {timeout_s:g}s waiting for {self.topics.device_id} to {goal} "
            f"(last reported: {seen}; device state: {self.device_state or 'unknown'})"
        ), _plain(self.last_entry) if self.last_entry else None)


def _plain(entry: ModelEntry) -> dict[str, Any]:
    plain: dict[str, Any] = msgspec.to_builtins(entry)
    return plain


def _refusal(reported: Reported, revision: int) -> WaitResult | None:
    """The agent refused our manifest (bad signature, rollback, expired, ...)."""
    error = reported.last_error
    if error is not None and error.startswith(f"manifest revision {revision} refused"):
        device = reported.device_id or "the device"
        return WaitResult(False, f"{device} refused the manifest: {error}")
    return None


def _revision(reported: Reported) -> int:
    return -1 if reported.revision is None else reported.revision


# -- the whole deploy ---------------------------------------------------------------


@dataclass(frozen=True)
class DeployOutcome:
    topic: str
    manifest: Manifest
    wait: WaitResult | None = None


def deploy(
    conn: Connection,
    topics: Topics,
    *,
    upsert: ModelSpec | None = None,
    remove: str | None = None,
    wait_s: float | None = None,
    signer: Signer | None = None,
    rollback: bool = False,
    traffic: Sequence[tuple[str, int]] = (),
    shadow: str | None = None,
) -> DeployOutcome:
    """Publish the next desired revision with one model added/replaced or removed.

    With `wait_s`, follow `reported` until the agent serves (or has dropped) the model.
    With `signer`, the manifest is signed (agents with trusted keys refuse it otherwise).
    A version older than the one the device serves is refused unless `rollback` says it
    is meant; the manifest then carries `"rollback": true`. `traffic` and `shadow` serve
    several versions of the name at once (fleet/abtest.py).
    """
    if (upsert is None) == (remove is None):
        raise ValueError("deploy one model or remove one, not both or neither")
    current, reported = _read_state(conn, topics)
    versions = None
    if upsert is not None and (traffic or shadow is not None):
        try:
            versions = name_versions(upsert, current, traffic, shadow)
        except VersionsError as exc:
            raise DeployError(str(exc)) from None
    # An older version deployed beside the one served (A/B, shadow) rolls nothing back.
    if upsert is not None and not rollback and (
            served := older_than_served(upsert, current, reported)) is not None and (
            versions is None or all(m.version != served for m in versions)):
        raise DeployError(
            f"{upsert.name}:{upsert.version} is older than {upsert.name}:{served}, which "
            f"{topics.device_id} serves; pass --rollback to roll back on purpose")
    manifest = next_manifest(current, upsert=upsert, remove=remove, rollback=rollback,
                             applied=reported.revision if reported else None,
                             versions=versions)
    # Subscribe before publishing so no report about this revision can slip by.
    watcher = ReportWatcher(conn, topics) if wait_s is not None else None
    try:
        publish_desired(conn, topics, manifest, signer=signer)
        if watcher is None or wait_s is None:
            return DeployOutcome(topics.desired, manifest)
        if upsert is not None:
            mine = next((m for m in versions or () if m.version == upsert.version), None)
            result = watcher.wait_serving(
                upsert.name, upsert.version, upsert.sha256, manifest.revision, wait_s,
                None if mine is None else (mine.traffic, mine.shadow))
        else:
            assert remove is not None
            result = watcher.wait_removed(remove, manifest.revision, wait_s)
        return DeployOutcome(topics.desired, manifest, result)
    finally:
        if watcher is not None:
            watcher.close()
