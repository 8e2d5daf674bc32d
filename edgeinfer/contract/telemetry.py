"""The agent's `telemetry` document as typed Structs (docs/protocol.md "Telemetry").

Sent every `telemetry.interval_s` at QoS 0, never retained. The agent builds a `Telemetry`
(agent/telemetry.py) and encodes it with edgeinfer.contract.documents.encode; the fleet reads
it with `read_telemetry`, leniently (edgeinfer.contract.lenient): a field an older agent or
the simulator does not send takes its default, a field of the wrong type is dropped.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType

from edgeinfer.contract import lenient


class MemoryFigures(msgspec.Struct):
    total: int = 0  # bytes
    available: int = 0
    percent: float = 0.0


class DiskFigures(msgspec.Struct):
    """The state disk (the one holding `state_dir`)."""

    total: int = 0  # bytes
    free: int = 0
    percent: float = 0.0


class ProcessFigures(msgspec.Struct):
    rss: int = 0  # bytes
    threads: int = 0


class Health(msgspec.Struct):
    """The host as psutil sees it."""

    cpu_percent: float = 0.0
    load_avg: list[float] = []  # 1, 5, 15 minutes
    memory: MemoryFigures = msgspec.field(default_factory=MemoryFigures)
    disk: DiskFigures = msgspec.field(default_factory=DiskFigures)
    process: ProcessFigures = msgspec.field(default_factory=ProcessFigures)
    # sensor "chip/label" -> degrees; left out of the wire where the host has no sensors
    temperatures_c: dict[str, float] | UnsetType = UNSET


class Percentiles(msgspec.Struct):
    """Over the last 2,048 jobs of a model; None before its first job."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class ModelFigures(msgspec.Struct):
    """`inference.models["name:version"]`."""

    ok: int = 0
    # count per error code (what agents send); a plain count is accepted from others
    errors: dict[str, int] | int = {}
    latency_ms: Percentiles = msgspec.field(default_factory=Percentiles)  # queue + infer
    infer_ms: Percentiles = msgspec.field(default_factory=Percentiles)
    queue_ms: Percentiles = msgspec.field(default_factory=Percentiles)

    def error_count(self) -> int:
        return self.errors if isinstance(self.errors, int) else sum(self.errors.values())


class ShadowFigures(msgspec.Struct):
    """A shadow version's copies of its name's jobs (docs/protocol.md "A/B and shadow
    versions"): `inference.shadows["name:version"]` and the version's
    `reported.models[].shadow_stats`. Latencies are over the last 2,048 copies compared."""

    compared: int = 0  # copies run on the shadow and compared with the answer sent
    agreed: int = 0
    agreement: float | None = None  # agreed / compared; None before the first
    dropped: int = 0  # copies not run: the backlog was full, or the shadow was gone
    errors: int = 0  # copies whose shadow run failed (not compared)
    compare: str | None = None  # how: "top1" (classification tasks) or "allclose"
    shadow_ms: Percentiles = msgspec.field(default_factory=Percentiles)  # the shadow's run
    serving_ms: Percentiles = msgspec.field(default_factory=Percentiles)  # the answer's run


class StateDisk(msgspec.Struct):
    """The state disk's alarm (agent/diskalarm.py) and what waits in memory meanwhile."""

    full: bool = False
    full_episodes: int = 0
    held_jobs: int = 0
    waiting_answers: int = 0


class Inference(msgspec.Struct):
    jobs_ok: int = 0
    jobs_failed: int = 0
    errors_by_code: dict[str, int] = {}
    models: dict[str, ModelFigures] = {}  # by "name:version"
    shadows: dict[str, ShadowFigures] = {}  # shadow versions, by "name:version"
    state_disk: StateDisk = msgspec.field(default_factory=StateDisk)


class Durability(msgspec.Struct):
    """Journal and outbox fill, and what their bounds turned away (docs/protocol.md
    "Durability")."""

    journal_queued: int = 0
    journal_limit: int = 0
    jobs_rejected_full: int = 0
    duplicates_answered: int = 0
    executions: int = 0
    outbox_messages: int = 0
    outbox_bytes: int = 0
    outbox_limit_messages: int = 0
    outbox_limit_bytes: int = 0
    outbox_refused_by_broker: int = 0
    outbox_oversize_replaced: int = 0
    events_dropped: int = 0


class Telemetry(msgspec.Struct):
    """`dev/{dev}/telemetry`."""

    ts: float | None = None  # Unix time, seconds
    health: Health = msgspec.field(default_factory=Health)
    queue_depth: int = 0  # jobs journaled and not yet answered
    inference: Inference = msgspec.field(default_factory=Inference)
    durability: Durability = msgspec.field(default_factory=Durability)


def read_telemetry(payload: bytes) -> Telemetry | None:
    """A `telemetry` payload, or None when it is no JSON object."""
    return lenient.decode(payload, Telemetry)
