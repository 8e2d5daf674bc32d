"""One measured point: a closed loop of N jobs in flight against one responder, with the
CPU time each process spent per answer inside the measuring window; a series of points over
rising levels, skipping those that could not finish in time; and their one-line summaries."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen, profile
from bench.subprocs import Watched
from edgeinfer.fleet.client import InferenceClient

CORES = psutil.cpu_count() or 1

Say = Callable[[str], None]


@dataclass(frozen=True)
class Timing:
    warmup_s: float
    measure_s: float
    max_s: float  # per point, warm-up included
    online_runs: int


def run_point(client: InferenceClient, template: loadgen.Template, concurrency: int,
              timing: Timing, watched: Watched,
              check: Callable[[dict[str, Any]], str | None] = loadgen.answer_error,
              thread_names: dict[int, str] | None = None,
              on_window: Callable[[], None] | None = None) -> dict[str, Any]:
    """One closed-loop point, with the CPU time each process (and, given `thread_names`,
    each of the target's threads) spent per answer inside the measuring window."""
    before: list[tuple[float, float, float, float]] = []
    after: list[tuple[float, float, float, float]] = []
    threads_before: list[dict[int, float]] = []
    threads_after: list[dict[int, float]] = []
    marks: list[float] = []
    pid = watched.target.pid if watched.target is not None else None

    def window() -> None:
        marks.append(time.perf_counter())
        before.append(watched.snapshot())
        if thread_names is not None and pid is not None:
            threads_before.append(profile.thread_cpu(pid))
        if on_window is not None:
            on_window()

    def window_end() -> None:
        after.append(watched.snapshot())
        if threads_before and pid is not None:
            threads_after.append(profile.thread_cpu(pid))
        marks.append(time.perf_counter())

    point = loadgen.measure(
        client, template, concurrency, warmup_s=timing.warmup_s, measure_s=timing.measure_s,
        max_s=timing.max_s, min_answers=concurrency, check=check, on_window=window,
        on_window_end=window_end,
    )
    out = point.as_dict()
    if before and after and point.completed:
        # CPU time inside the measuring window, per answer that arrived in it.
        for name, b, a in zip(("target", "broker", "client"), before[0][:3], after[0][:3],
                              strict=True):
            out[f"{name}_cpu_ms_per_job"] = round((a - b) * 1000 / point.completed, 3)
        if threads_before and threads_after and thread_names is not None:
            out["target_threads_cpu_ms_per_job"] = profile.per_thread_ms(
                threads_before[0], threads_after[0], thread_names, point.completed)
    if before and after and len(marks) == 2:
        ours = sum(a - b for a, b in zip(after[0][:3], before[0][:3], strict=True))
        # Busy CPU of the machine not spent by the target, the broker or this client, as a
        # share of all cores over the window: another workload competing for the cores.
        elsewhere = (after[0][3] - before[0][3]) - ours
        out["other_cpu_share"] = round(max(0.0, elsewhere) / ((marks[1] - marks[0]) * CORES), 3)
    out["request_bytes"] = template.size
    return out


def too_slow(level: int, best: float | None, timing: Timing) -> str | None:
    """Why a point at `level` in flight would not fit its time limit, judged by the best
    throughput seen at lower levels (a warm-up and a window each need `level` answers)."""
    if best is None:
        return None
    if best <= 0:
        return "skipped: no answers at a lower level"
    need = timing.warmup_s + 2 * level / best
    if need <= timing.max_s:
        return None
    return (f"skipped: {level} in flight needs ~{need:.0f} s at {best:.1f} jobs/s "
            f"(limit {timing.max_s:g} s a point)")


def run_levels(levels: tuple[int, ...], timing: Timing, measure_one: Callable[[int], dict[str, Any]],
               report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    best: float | None = None
    for level in levels:
        why = too_slow(level, best, timing)
        p: dict[str, Any] = {"concurrency": level, "skipped": why} if why else measure_one(level)
        if not why:
            best = max(best or 0.0, float(p["throughput"] or 0.0))
        points.append(p)
        report(p)
    return points


def point_reporter(say: Say, what: str, mode: str) -> Callable[[dict[str, Any]], None]:
    return lambda p: say(point_line(what, mode, p))


def point_line(what: str, mode: str, p: dict[str, Any]) -> str:
    if p.get("skipped"):
        return f"{what:26s} {mode:6s} c={p['concurrency']:<3d} {p['skipped']}"
    lat = f"p50 {p['p50_ms']:8.2f} ms p99 {p['p99_ms']:8.2f} ms" if p["p50_ms"] is not None else "no answers"
    err = f"  errors {p['errors']} ({p.get('error_sample')})" if p["errors"] else ""
    return (f"{what:26s} {mode:6s} c={p['concurrency']:<3d} {p['throughput']:9.1f} jobs/s  "
            f"{lat}{err}")


def profiled_point(client: InferenceClient, template: loadgen.Template, level: int,
                    timing: Timing, watched: Watched, names: dict[int, str], out_dir: Path,
                    tag: str) -> dict[str, Any]:
    assert watched.target is not None
    pid = watched.target.pid
    seconds = max(timing.measure_s, 2.0)
    result: dict[str, Any] = {}
    sampler = threading.Thread(
        target=lambda: result.update(profile.profile_point(pid, seconds, out_dir, tag)),
        name="py-spy", daemon=True)
    slow = Timing(timing.warmup_s, seconds, seconds + timing.max_s, timing.online_runs)
    p = run_point(client, template, level, slow, watched, thread_names=names,
                  on_window=sampler.start)
    sampler.join(seconds + 60)
    result["point_under_profiler"] = {k: p.get(k) for k in (
        "concurrency", "throughput", "p50_ms", "agent_infer_ms_p50", "agent_queue_ms_p50",
        "target_cpu_ms_per_job", "target_threads_cpu_ms_per_job")}
    return result
