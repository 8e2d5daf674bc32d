"""One simulated agent (`SimDevice`): the documents it publishes and how it applies a
desired manifest; with the simulation's settings (`SimConfig`) and counters (`SimStats`).

Every method of a `SimDevice` runs on its group's network thread (fleet/simulator/group.py),
which it reaches through the small `DeviceHost` interface: settings, counters, random
numbers and timers.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
import paho.mqtt.client as paho

from edgeinfer.contract import documents
from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.documents import Attempt, Hardware, ModelEntry, Reported, State
from edgeinfer.contract.telemetry import (
    DiskFigures,
    Health,
    Inference,
    MemoryFigures,
    ModelFigures,
    Percentiles,
    ProcessFigures,
    Telemetry,
)
from edgeinfer.contract.topics import DEFAULT_PREFIX, DEVICE_ID_RE, Topics
from edgeinfer.contract.transport import TransportSecurity

SIM_AGENT_VERSION = "0.1.0+sim"
_CPUS = ("ARM Cortex-A72", "ARM Cortex-A78AE", "Intel(R) Celeron(R) J4125 CPU @ 2.00GHz",
         "Intel(R) Core(TM) i5-1145G7E @ 2.60GHz", "Intel(R) Atom(TM) x6425E @ 2.00GHz")


@dataclass
class SimConfig:
    devices: int = 10
    broker_url: str = DEFAULT_BROKER_URL
    prefix: str = DEFAULT_PREFIX
    id_prefix: str = "sim-"
    report_every_s: float = 10.0
    # Each install takes uniformly between these (seconds).
    install_delay_s: tuple[float, float] = (0.5, 1.5)
    # "name" (every version) or "name:version": installs of these fail.
    fail: frozenset[str] = frozenset()
    jobs_per_s: float = 1.0  # simulated job rate per serving model, in telemetry
    error_rate: float = 0.0  # share of those jobs that fail
    connect_rate: float = 500.0  # new connections per second (per thread)
    keepalive_s: int = 60
    threads: int = 1
    seed: int | None = None
    security: TransportSecurity | None = None

    def device_ids(self) -> list[str]:
        width = max(4, len(str(self.devices - 1)))
        ids = [f"{self.id_prefix}{i:0{width}d}" for i in range(self.devices)]
        for dev in ids[:1] + ids[-1:]:
            if not DEVICE_ID_RE.match(dev):
                raise ValueError(f"device id {dev!r} (from --id-prefix {self.id_prefix!r}) must "
                                 f"match {DEVICE_ID_RE.pattern}")
        return ids

    def fails(self, name: str, version: str) -> bool:
        return name in self.fail or f"{name}:{version}" in self.fail


@dataclass
class SimStats:
    """Counters over every device (written by the network threads; read anywhere)."""

    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    telemetry_sent: int = 0
    manifests: int = 0
    installs_ok: int = 0
    installs_failed: int = 0

    def line(self, total: int) -> str:
        return (f"{self.connected}/{total} connected, {self.telemetry_sent} telemetry sent, "
                f"{self.manifests} manifests, {self.installs_ok} installs ok, "
                f"{self.installs_failed} failed, {self.disconnects} disconnects")


def _now_iso() -> str:
    # Milliseconds: the controller and the rollout engine tell reports apart by this stamp.
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _ModelCounters:
    ok: int = 0
    errors: int = 0
    base_ms: float = 5.0


@dataclass
class _Install:
    generation: int
    revision: int
    models: list[dict[str, Any]]


class DeviceHost(Protocol):
    """What a device needs of the group that runs it (all on the group's network thread)."""

    cfg: SimConfig
    stats: SimStats
    rng: random.Random

    def after(self, delay_s: float, fn: Callable[[], None]) -> None: ...


@dataclass
class SimDevice:
    """One simulated agent; every method runs on its group's network thread."""

    device_id: str
    topics: Topics
    group: DeviceHost
    client: paho.Client
    hardware: Hardware
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: str = field(default_factory=_now_iso)
    connected: bool = False
    attempt: int = 0
    applied_revision: int | None = None
    last_error: str | None = None
    # (name, version) -> the reported entry; serving ones and the latest failures.
    statuses: dict[tuple[str, str], ModelEntry] = field(default_factory=dict)
    counters: dict[str, _ModelCounters] = field(default_factory=dict)
    generation: int = 0  # bumped per manifest: a newer one supersedes an install under way
    last_manifest: bytes = b""
    jobs_ok: int = 0
    jobs_failed: int = 0

    @property
    def cfg(self) -> SimConfig:
        return self.group.cfg

    # -- messages ---------------------------------------------------------------------

    # The documents are the contract's (edgeinfer.contract.documents), as a real agent's.

    def state_payload(self, state: str) -> bytes:
        return documents.encode(State(state=state, agent_version=SIM_AGENT_VERSION,
                                      session_id=self.session_id, started_at=self.started_at))

    def reported(self) -> Reported:
        return Reported(device_id=self.device_id, agent_version=SIM_AGENT_VERSION,
                        revision=self.applied_revision, models=list(self.statuses.values()),
                        last_error=self.last_error, hardware=self.hardware,
                        updated_at=_now_iso())

    def publish(self, topic: str, doc: msgspec.Struct | bytes, *, qos: int = 1,
                retain: bool = False) -> None:
        if not self.connected:
            return  # reconnecting publishes state and reported afresh
        payload = doc if isinstance(doc, bytes) else documents.encode(doc)
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def publish_reported(self) -> None:
        self.publish(self.topics.reported, self.reported(), retain=True)

    def event(self, kind: str, **fields: Any) -> None:
        ev, extra = documents.event(kind, _now_iso(), self.device_id, fields)
        self.publish(self.topics.events, documents.encode_event(ev, extra))

    def telemetry(self) -> Telemetry:
        rng = self.group.rng
        dt = self.cfg.report_every_s
        models: dict[str, ModelFigures] = {}
        for (name, version), entry in self.statuses.items():
            if entry.state != "serving":
                continue
            key = f"{name}:{version}"
            c = self.counters.setdefault(key, _ModelCounters(base_ms=_base_latency(name, rng)))
            jobs = _poisson(rng, self.cfg.jobs_per_s * dt)
            errors = sum(1 for _ in range(jobs) if rng.random() < self.cfg.error_rate)
            c.ok += jobs - errors
            c.errors += errors
            self.jobs_ok += jobs - errors
            self.jobs_failed += errors
            infer = c.base_ms * rng.uniform(0.9, 1.1)
            queue = infer * rng.uniform(0.05, 0.3)
            models[key] = ModelFigures(
                ok=c.ok,
                errors={"INTERNAL": c.errors} if c.errors else {},
                latency_ms=_percentiles(infer + queue),
                infer_ms=_percentiles(infer),
                queue_ms=_percentiles(queue),
            )
        memory = (self.hardware.memory_mb or 0) << 20
        return Telemetry(
            ts=time.time(),
            health=Health(
                cpu_percent=round(rng.uniform(3, 40), 1),
                load_avg=[round(rng.uniform(0.1, 2.0), 2) for _ in range(3)],
                memory=MemoryFigures(total=memory, available=int(memory * 0.6),
                                     percent=round(rng.uniform(20, 60), 1)),
                disk=DiskFigures(total=32 << 30, free=20 << 30, percent=37.5),
                process=ProcessFigures(rss=180 << 20, threads=14),
            ),
            queue_depth=0,
            inference=Inference(jobs_ok=self.jobs_ok, jobs_failed=self.jobs_failed,
                                errors_by_code={"INTERNAL": self.jobs_failed}
                                if self.jobs_failed else {},
                                models=models),
        )

    # -- desired state ----------------------------------------------------------------

    def on_desired(self, payload: bytes) -> None:
        if not payload or payload == self.last_manifest:
            return  # a deletion, or the same manifest again (a resubscribe)
        self.last_manifest = payload
        self.group.stats.manifests += 1
        try:
            doc = json.loads(payload)
            revision = int(doc["revision"])
            models = [m for m in doc.get("models") or [] if isinstance(m, dict)]
            for m in models:
                m["name"], m["version"] = str(m["name"]), str(m["version"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.refuse(None, "invalid", f"cannot read the manifest: {exc}")
            return
        if self.applied_revision is not None and revision < self.applied_revision:
            self.refuse(revision, "rollback",
                        f"revision {revision} is lower than the applied {self.applied_revision}")
            return
        self.generation += 1
        self.event("deploy_started", revision=revision)
        for m in models:
            key = (m["name"], m["version"])
            current = self.statuses.get(key)
            if current is None or current.state != "serving" \
                    or current.sha256 != m.get("sha256"):
                self.statuses[key] = _entry(m, "loading")
        self.publish_reported()
        lo, hi = self.cfg.install_delay_s
        job = _Install(self.generation, revision, models)
        self.group.after(self.group.rng.uniform(lo, hi), lambda: self.finish(job))

    def refuse(self, revision: int | None, reason: str, message: str) -> None:
        self.last_error = f"manifest revision {revision} refused ({reason}): {message}"
        self.event("manifest_rejected", reason=reason, message=message, revision=revision)
        self.publish_reported()

    def finish(self, job: _Install) -> None:
        if job.generation != self.generation:
            return  # a newer manifest came meanwhile: it decides
        statuses: dict[tuple[str, str], ModelEntry] = {}
        failures: list[str] = []
        loaded: set[str] = set()
        for m in job.models:
            key = (m["name"], m["version"])
            old = self.statuses.get(key)
            if old is not None and old.state == "serving" and old.sha256 == m.get("sha256"):
                statuses[key] = old
                loaded.add(key[0])
            elif self.cfg.fails(*key):
                error = f"simulated failure: {key[0]}:{key[1]} is configured to fail"
                statuses[key] = _entry(m, "failed", error)
                failures.append(f"{key[0]}:{key[1]}: {error}")
                self.group.stats.installs_failed += 1
                self.event("model_failed", model=key[0], version=key[1], stage="load",
                           message=error)
            else:
                statuses[key] = _entry(m, "serving")
                loaded.add(key[0])
                self.group.stats.installs_ok += 1
                self.event("model_serving", model=key[0], version=key[1], runtime="onnxruntime",
                           device="CPU", precision="f32", autotune=None)
        # A name whose new versions all failed keeps serving what it served.
        wanted = {m["name"] for m in job.models}
        for key, entry in self.statuses.items():
            if entry.state == "serving" and key[0] in wanted - loaded \
                    and key not in statuses:
                statuses[key] = entry
                self.event("kept_serving", model=key[0], version=key[1])
        for key, entry in self.statuses.items():
            if entry.state == "serving" and key not in statuses:
                self.event("model_unloaded", model=key[0], version=key[1])
        self.statuses = statuses
        if failures:
            self.last_error = "; ".join(failures)
            self.event("deploy_failed", revision=job.revision)
        else:
            self.applied_revision = job.revision
            self.last_error = None
            self.event("deploy_finished", revision=job.revision)
        self.publish_reported()


def _entry(m: dict[str, Any], state: str, error: str | None = None) -> ModelEntry:
    loading = state == "loading"
    entry = ModelEntry(
        name=m["name"], version=m["version"], sha256=m.get("sha256"), state=state,
        runtime=None if loading else "onnxruntime", device=None if loading else "CPU",
        error=error,
        attempts=[] if loading else [Attempt("onnxruntime", "CPU", state == "serving", error)],
    )
    if state == "serving":
        entry = msgspec.structs.replace(entry, precision="f32", candidates=[], autotune=None,
                                        failovers=[])
    return entry


def _base_latency(name: str, rng: random.Random) -> float:
    """A plausible per-model latency (ms): stable per model name, a little per device."""
    per_model = 2.0 + (zlib.crc32(name.encode()) % 400) / 10.0  # 2..42 ms
    return per_model * rng.uniform(0.8, 1.25)


def _percentiles(median: float) -> Percentiles:
    return Percentiles(round(median, 3), round(median * 1.6, 3), round(median * 2.2, 3))


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def simulated_hardware(rng: random.Random) -> Hardware:
    """A plausible `reported.hardware` of a small CPU-only gateway."""
    cores = rng.choice((2, 4, 4, 8))
    return msgspec.convert({
        "cpu": {"model": rng.choice(_CPUS), "cores_physical": cores, "cores_logical": cores,
                "flags": []},
        "memory_mb": rng.choice((2048, 4096, 8192)),
        "nvidia_gpus": [],
        "onnxruntime": {"version": "1.20.0", "providers": ["CPUExecutionProvider"]},
        "openvino": {"version": "2024.6.0", "devices": {"CPU": "simulated CPU"}},
        "errors": [],
    }, Hardware)
