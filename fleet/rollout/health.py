"""The health gate of a bake: each device's counters and latencies for the rollout's
model version, read from its last telemetry, and the verdict over all of them.

Health metrics: the error share over every job since each device began serving the
version (all touched devices together), and the worst device's latency percentile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeinfer.contract import lenient
from edgeinfer.contract.telemetry import Telemetry as TelemetryDocument
from edgeinfer.fleet.registry import Telemetry
from edgeinfer.fleet.rollout.spec import SERVING, Rollout, RolloutDevice, parse_health


@dataclass(frozen=True)
class ModelStats:
    ok: int
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)


def model_stats(telemetry: dict[str, Any] | None, key: str) -> ModelStats | None:
    """`inference.models[key]` of a telemetry document (read leniently: any shape)."""
    tele = lenient.convert(telemetry, TelemetryDocument)
    entry = tele.inference.models.get(key) if tele is not None else None
    if entry is None:
        return None
    latency = {q: v for q in ("p50", "p95", "p99")
               if (v := getattr(entry.latency_ms, q)) is not None}
    return ModelStats(entry.ok, entry.error_count(), latency)


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    message: str
    measured: dict[str, float] = field(default_factory=dict)


def evaluate(r: Rollout, devices: list[RolloutDevice],
             telemetry_of: Callable[[str], Telemetry | None]) -> Verdict:
    """The health gate over every device serving the version in this rollout."""
    rules = parse_health(r.health)
    ok = errors = 0
    worst: dict[str, tuple[float, str]] = {}
    for d in devices:
        if d.state != SERVING:
            continue
        telemetry = telemetry_of(d.device_id)
        stats = model_stats(telemetry.body if telemetry else None, r.target)
        if stats is None:
            continue
        new_ok, new_errors = max(stats.ok - d.base_ok, 0), max(stats.errors - d.base_errors, 0)
        ok, errors = ok + new_ok, errors + new_errors
        if new_ok + new_errors == 0:
            continue  # no job on the version yet: its percentiles say nothing
        for q in ("p50", "p95", "p99"):
            value = stats.latency_ms.get(q)
            if value is not None and value > worst.get(q, (-1.0, ""))[0]:
                worst[q] = (value, d.device_id)
    measured: dict[str, float] = {}
    where: dict[str, str] = {}
    if ok + errors:
        measured["error_rate"] = errors / (ok + errors)
        where["error_rate"] = f"{errors} of {ok + errors} jobs"
    for q, (value, dev_id) in worst.items():
        measured[f"{q}_ms"] = value
        where[f"{q}_ms"] = dev_id
    for rule in rules:
        value = measured.get(rule.metric)
        if value is not None and not rule.holds(value):
            shown = f"{value * 100:.3g}%" if rule.metric == "error_rate" else f"{value:.4g}"
            return Verdict(False, f"{rule.metric} {shown} ({where[rule.metric]}) breaks "
                                  f"{rule}", measured)
    return Verdict(True, "healthy" if measured else "no jobs yet", measured)
