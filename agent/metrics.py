"""In-process inference metrics: counts, errors and latency percentiles per model."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Recent latencies kept per model for percentiles: enough for a stable p99.
WINDOW = 2048


@dataclass
class _ModelStats:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    total_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    infer_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    queue_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


@dataclass
class _ShadowStats:
    """A shadow version's copies (agent/shadow.py)."""

    compare: str | None = None
    compared: int = 0
    agreed: int = 0
    dropped: int = 0
    errors: int = 0
    shadow_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    serving_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))


def percentiles(values: deque[float] | list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.fromiter(values, dtype=np.float64), [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _ModelStats] = {}
        self._shadows: dict[str, _ShadowStats] = {}  # by the shadow's "name:version"
        self.errors_by_code: dict[str, int] = {}
        self.jobs_ok = 0
        self.jobs_failed = 0
        # The state disk (agent/diskalarm.py): full now, and how often it filled up.
        self.disk_full = False
        self.disk_full_episodes = 0
        # What waits in memory meanwhile (agent/intake.py, agent/answers.py): jobs neither journaled nor
        # acknowledged, answers not yet recorded.
        self.disk_held_jobs = 0
        self.disk_waiting_answers = 0

    def state_disk(self, *, full: bool) -> None:
        with self._lock:
            if full and not self.disk_full:
                self.disk_full_episodes += 1
            self.disk_full = full

    def disk_backlog(self, held_jobs: int, waiting_answers: int) -> None:
        with self._lock:
            self.disk_held_jobs = held_jobs
            self.disk_waiting_answers = waiting_answers

    def record_ok(self, model: str, queue_ms: float, infer_ms: float, total_ms: float) -> None:
        with self._lock:
            s = self._models.setdefault(model, _ModelStats())
            s.ok += 1
            s.queue_ms.append(queue_ms)
            s.infer_ms.append(infer_ms)
            s.total_ms.append(total_ms)
            self.jobs_ok += 1

    def record_error(self, model: str | None, code: str) -> None:
        with self._lock:
            self.jobs_failed += 1
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
            if model is not None:
                s = self._models.setdefault(model, _ModelStats())
                s.errors[code] = s.errors.get(code, 0) + 1

    def record_shadow(self, shadow: str, compare: str, agreed: bool | None,
                      serving_ms: float, shadow_ms: float | None) -> None:
        """A copy run on shadow version `shadow`: `agreed` None when its run failed."""
        with self._lock:
            s = self._shadows.setdefault(shadow, _ShadowStats())
            s.compare = compare
            if agreed is None:
                s.errors += 1
                return
            s.compared += 1
            s.agreed += agreed
            s.serving_ms.append(serving_ms)
            if shadow_ms is not None:
                s.shadow_ms.append(shadow_ms)

    def shadow_dropped(self, shadow: str) -> None:
        with self._lock:
            self._shadows.setdefault(shadow, _ShadowStats()).dropped += 1

    def shadow_figures(self) -> dict[str, dict[str, Any]]:
        """Per shadow version, as telemetry's `inference.shadows` holds them."""
        with self._lock:
            return {
                name: {
                    "compared": s.compared, "agreed": s.agreed,
                    "agreement": round(s.agreed / s.compared, 4) if s.compared else None,
                    "dropped": s.dropped, "errors": s.errors, "compare": s.compare,
                    "shadow_ms": percentiles(s.shadow_ms),
                    "serving_ms": percentiles(s.serving_ms),
                }
                for name, s in self._shadows.items()
            }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            models = {
                name: {
                    "ok": s.ok,
                    "errors": dict(s.errors),
                    "latency_ms": percentiles(s.total_ms),
                    "infer_ms": percentiles(s.infer_ms),
                    "queue_ms": percentiles(s.queue_ms),
                }
                for name, s in self._models.items()
            }
            out = {
                "jobs_ok": self.jobs_ok,
                "jobs_failed": self.jobs_failed,
                "errors_by_code": dict(self.errors_by_code),
                "models": models,
                "state_disk": {
                    "full": self.disk_full,
                    "full_episodes": self.disk_full_episodes,
                    "held_jobs": self.disk_held_jobs,
                    "waiting_answers": self.disk_waiting_answers,
                },
            }
        out["shadows"] = self.shadow_figures()
        return out
