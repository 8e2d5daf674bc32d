"""What a rollout is: its statuses, the command line's specs (waves, failures, health
gates) and the two records the store keeps (`Rollout`, `RolloutDevice`).

    edge-fleet rollout start digits:4 --group site=berlin --waves 1,10%,50%,100% \\
        --max-failures 5% --health "error_rate<1%,p95_ms<50" --bake 60s

Pure values: nothing here touches the registry or the broker.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# Rollout statuses. `aborting` is a request (from `rollout abort`) the engine carries out.
RUNNING, PAUSED, ABORTING = "running", "paused", "aborting"
COMPLETED, HALTED, ROLLED_BACK, ABORTED = "completed", "halted", "rolled_back", "aborted"
TERMINAL = frozenset({COMPLETED, HALTED, ROLLED_BACK, ABORTED})
# Wave phases.
DEPLOYING, BAKING = "deploying", "baking"
# Device states within a rollout.
PENDING, SERVING, FAILED = "pending", "serving", "failed"

DEFAULT_INSTALL_TIMEOUT_S = 300.0


class RolloutError(Exception):
    """A rollout that cannot be started or changed; the message says why."""


# -- parsing the command line's specs -------------------------------------------------------


@dataclass(frozen=True)
class Amount:
    """A number of devices, absolute (`3`) or a share of the group (`10%`)."""

    value: float
    percent: bool

    def of(self, group_size: int) -> int:
        if not self.percent:
            return int(self.value)
        return math.ceil(self.value * group_size / 100 - 1e-9)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


def parse_amount(text: str, what: str) -> Amount:
    raw = text.strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1])
            if not 0 <= value <= 100:
                raise ValueError
            return Amount(value, True)
        number = int(raw)
        if number < 0:
            raise ValueError
        return Amount(number, False)
    except ValueError:
        raise RolloutError(f"{what} {text!r}: say a count (3) or a percentage (10%)") from None


def parse_waves(text: str) -> list[Amount]:
    """`1,10%,50%,100%`: cumulative targets; the last must cover the whole group."""
    waves = [parse_amount(p, "wave") for p in text.split(",") if p.strip()]
    if not waves:
        raise RolloutError("--waves needs at least one wave, e.g. 1,10%,50%,100%")
    if any(w.value <= 0 for w in waves):
        raise RolloutError(f"--waves {text!r}: every wave must add devices (no 0 or 0%)")
    last = waves[-1]
    if not (last.percent and last.value == 100):
        waves.append(Amount(100, True))
    return waves


# Health metrics: the error share over every job since each device began serving the
# version (all touched devices together), and the worst device's latency percentile.
_METRICS = {"error_rate", "p50_ms", "p95_ms", "p99_ms"}
_RULE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|<)\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class Rule:
    metric: str
    op: str
    limit: float  # error_rate as a fraction (1% -> 0.01); latencies in ms

    def holds(self, measured: float) -> bool:
        return measured < self.limit if self.op == "<" else measured <= self.limit

    def __str__(self) -> str:
        if self.metric == "error_rate":
            return f"{self.metric}{self.op}{self.limit * 100:g}%"
        return f"{self.metric}{self.op}{self.limit:g}"


def parse_health(text: str) -> list[Rule]:
    """`error_rate<1%,p95_ms<50`: every rule must hold during the bake."""
    rules = []
    for part in (p for p in text.split(",") if p.strip()):
        m = _RULE_RE.match(part)
        if not m or m.group(1) not in _METRICS:
            raise RolloutError(
                f"--health part {part!r}: say METRIC<VALUE with METRIC one of "
                f"{', '.join(sorted(_METRICS))}, e.g. error_rate<1%,p95_ms<50")
        metric, op, value, pct = m.groups()
        limit = float(value)
        if metric == "error_rate":
            limit = limit / 100 if pct else limit
        elif pct:
            raise RolloutError(f"--health part {part!r}: {metric} is in milliseconds, not %")
        rules.append(Rule(metric, op, limit))
    return rules


# -- records --------------------------------------------------------------------------------


@dataclass
class Rollout:
    id: int
    model: str
    version: str
    sha256: str
    spec: dict[str, Any]  # the manifest entry every device gets
    selector: str
    waves: list[str]
    max_failures: str
    health: str
    bake_s: float
    install_timeout_s: float
    status: str = RUNNING
    wave: int = 0  # index into waves
    phase: str = DEPLOYING
    bake_until: float | None = None
    reason: str | None = None
    created_at: str = ""
    updated_at: str = ""
    driver: str | None = None
    lease_until: float | None = None

    @property
    def target(self) -> str:
        return f"{self.model}:{self.version}"

    def wave_amounts(self) -> list[Amount]:
        return [parse_amount(w, "wave") for w in self.waves]

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class RolloutDevice:
    rollout_id: int
    device_id: str
    wave: int
    state: str = PENDING
    revision: int | None = None
    published_at: float = 0.0
    deadline: float = 0.0
    reported_before: str | None = None  # the device's reported_at when we published
    prev_spec: dict[str, Any] | None = None  # what it had before (None: no such model)
    base_ok: int = 0  # telemetry counters when it began serving the version
    base_errors: int = 0
    error: str | None = None
    reverted: bool = False
    updated_at: str = ""

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
