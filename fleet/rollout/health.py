"""The health gate of a bake: each device's counters and latencies for the rollout's
model version, read from its last telemetry, and the verdict over all of them.

Health metrics: the error share over every job since each device began serving the
version (all touched devices together), and the worst device's latency percentile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeinfer.fleet.registry import Telemetry
from edgeinfer.fleet.rollout.spec import SERVING, Rollout, RolloutDevice, parse_health


def _count(value: Any) -> int:
    """`ok` is a number; `errors` is a number or (what agents send) a count per code."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    return 0


@dataclass(frozen=True)
class ModelStats:
    ok: int
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)


def model_stats(telemetry: dict[str, Any] | None, key: str) -> ModelStats | None:
    """`inference.models[key]` of a telemetry document, tolerating any shape."""
    if not isinstance(telemetry, dict):
        return None
    inference = telemetry.get("inference")
    models = inference.get("models") if isinstance(inference, dict) else None
    entry = models.get(key) if isinstance(models, dict) else None
    if not isinstance(entry, dict):
        return None
    lat = entry.get("latency_ms")
    latency = {k: float(v) for k, v in lat.items()
               if isinstance(v, int | float) and not isinstance(v, bool)} \
        if isinstance(lat, dict) else {}
    return ModelStats(_count(entry.get("ok")), _count(entry.get("errors")), latency)


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
