"""What a task pipeline costs per job besides the model: decoding, resizing, resampling,
tokenising, pooling, post-processing, measured beside the raw runtime calls in one run.

Each case is one job (an encoded image, an audio file, a prompt, texts) run through the
pipeline's `run` on ONNX Runtime (CPU, default threads, as the agent loads it) with the
session wrapped in a timer that adds up the time spent inside `session.infer`:

    job        the whole `pipeline.run`, wall clock
    runtime    the `session.infer` calls inside that job (all of them: VAD makes one per
               512-sample window, text generation one per token, OCR one per det/cls/rec batch)
    pre/post   job - runtime: everything the pipeline does around the model
    raw        the same model calls replayed directly on the session, with the very tensors
               the pipeline fed (captured once), no pipeline code in between

Every run does one job, then its raw replay, then each named sub-step once (decode,
tokenise, ...), so all of them see the same machine. After warm-up runs, the number of runs
is chosen from the warm-up time to last about the budget. Reported: p50 per job (ms), the
pre/post share of the job (median over runs of pre/post / job), and job / raw.

    python -m bench --only preprocess [--pipelines ocr embedding] [--quick] [--out DIR]

(`--out` elsewhere than docs/benchmarks keeps the committed latest.* as they are.)

Here: measuring the cases, running the part, and its section of latest.md and its plot,
`preprocess.png`. The cases themselves are built in `bench.preprocess_cases`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.preprocess_cases import BUILDERS, Case, TimedSession
from bench.raw import busy_cpu_s

# Case and BUILDERS are read as preprocess.X by tests/test_bench_preprocess.py.
__all__ = ["BUILDERS", "FULL", "METHOD", "PIPELINES", "QUICK", "Budget", "Case", "markdown_section",
           "measure", "plot", "run"]

PIPELINES = ("image-classification", "voice-activity-detection", "ocr", "text-generation",
             "embedding")
WARMUP_RUNS = 2


@dataclass(frozen=True)
class Budget:
    budget_s: float  # per case: runs of (job + raw replay + sub-steps)
    min_iters: int
    max_iters: int


QUICK = Budget(0.6, 3, 300)
FULL = Budget(2.5, 5, 2000)


def _replay(calls: list[tuple[TimedSession, dict[str, np.ndarray[Any, Any]], list[str] | None]]
            ) -> list[float]:
    times = []
    for timer, feed, outputs in calls:
        t0 = time.perf_counter()
        timer.inner.infer(feed, outputs)
        times.append(time.perf_counter() - t0)
    return times


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _p50(xs: Sequence[float]) -> float | None:
    return round(float(np.median(xs)) * 1000, 4) if xs else None


def measure(case: Case, budget: Budget) -> dict[str, Any]:
    timers = case.timers
    # Capture the feeds of one job, in call order across the roles.
    calls: list[tuple[TimedSession, dict[str, np.ndarray[Any, Any]], list[str] | None]] = []
    for t in timers.values():
        t.captured = calls
    out = case.job()
    for t in timers.values():
        t.captured = None
    tokens = case.tokens(out) if case.tokens else None

    def once() -> tuple[float, dict[str, float], float, list[float], dict[str, float]]:
        for t in timers.values():
            t.times = []
        t0 = time.perf_counter()
        case.job()
        job = time.perf_counter() - t0
        per_role = {role: sum(t.times) for role, t in timers.items()}
        raw_calls = _replay(calls)
        steps = {}
        for name, step in case.steps.items():
            t0 = time.perf_counter()
            step()
            steps[name] = time.perf_counter() - t0
        return job, per_role, sum(raw_calls), raw_calls, steps

    t0 = time.perf_counter()
    for _ in range(WARMUP_RUNS):
        once()
    est = max((time.perf_counter() - t0) / WARMUP_RUNS, 1e-6)
    n = int(min(max(budget.budget_s / est, budget.min_iters), budget.max_iters))
    me = psutil.Process()
    busy0, mine0, wall0 = busy_cpu_s(), _cpu(me), time.perf_counter()
    jobs, runtimes, pre_post, shares, raws, raw_call = [], [], [], [], [], []
    roles: dict[str, list[float]] = {r: [] for r in timers}
    steps: dict[str, list[float]] = {s: [] for s in case.steps}
    for _ in range(n):
        job, per_role, raw, raw_calls, step_times = once()
        runtime = sum(per_role.values())
        jobs.append(job)
        runtimes.append(runtime)
        pre_post.append(job - runtime)
        shares.append((job - runtime) / job)
        raws.append(raw)
        raw_call += raw_calls
        for r, v in per_role.items():
            roles[r].append(v)
        for s, v in step_times.items():
            steps[s].append(v)
    elsewhere = (busy_cpu_s() - busy0) - (_cpu(me) - mine0)
    other = max(0.0, elsewhere) / ((time.perf_counter() - wall0) * (psutil.cpu_count() or 1))
    job_p50, raw_p50 = _p50(jobs), _p50(raws)
    res: dict[str, Any] = {
        "pipeline": case.pipeline, "case": case.name, "input": case.input, "model": case.model,
        "runs": n, "model_calls_per_job": len(calls),
        "job_p50_ms": job_p50, "job_p99_ms": round(float(np.percentile(jobs, 99)) * 1000, 4),
        "runtime_in_job_p50_ms": _p50(runtimes),
        "pre_post_p50_ms": _p50(pre_post),
        "pre_post_share": round(float(np.median(shares)), 4),
        "raw_p50_ms": raw_p50,
        "raw_call_p50_ms": _p50(raw_call),
        "job_vs_raw": round(job_p50 / raw_p50, 3) if job_p50 and raw_p50 else None,
        "steps_p50_ms": {s: _p50(v) for s, v in steps.items()},
        "other_cpu_share": round(other, 3),
    }
    if len(timers) > 1:
        res["runtime_by_model_p50_ms"] = {r: _p50(v) for r, v in roles.items()}
        res["model_calls_by_model"] = {r: sum(c[0] is t for c in calls) for r, t in timers.items()}
    if tokens:
        res["tokens_per_job"] = tokens
        res["pre_post_per_token_ms"] = round(res["pre_post_p50_ms"] / tokens, 4)
        res["runtime_per_token_ms"] = round(res["runtime_in_job_p50_ms"] / tokens, 4)
    if case.note:
        res["note"] = case.note
    return res


def run(work: Path, budget: Budget, say: Callable[[str], None],
        pipelines: Sequence[str] | None = None) -> dict[str, Any]:
    """Every case of the pipelines named (default: all): {"cases": [...], "skipped": {...}}."""
    import onnxruntime

    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider, default threads",
        "budget": budget.__dict__, "cases": [], "skipped": {}, "method": METHOD,
    }
    for name in pipelines or PIPELINES:
        try:
            cases = BUILDERS[name](work)
        except Exception as exc:  # a missing wheel, library or font: say so, go on
            results["skipped"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            say(f"preprocess {name}: skipped: {results['skipped'][name]}")
            continue
        for case in cases:
            try:
                r = measure(case, budget)
            except Exception as exc:
                results["skipped"][f"{name}: {case.name}"] = f"{type(exc).__name__}: {exc}"
                say(f"preprocess {name} {case.name}: failed: {exc}")
                continue
            results["cases"].append(r)
            say(f"preprocess {name:24s} {case.name:30s} job p50 {r['job_p50_ms']:9.3f} ms  "
                f"runtime {r['runtime_in_job_p50_ms']:9.3f} ms  pre/post {r['pre_post_p50_ms']:8.3f} ms "
                f"({r['pre_post_share'] * 100:4.1f}%)  raw {r['raw_p50_ms']:9.3f} ms  n={r['runs']}")
        for case in cases:
            for t in case.timers.values():
                t.close()
    return results


METHOD = [
    "Pre-/post-processing: each case is one job through the pipeline's `run` on ONNX Runtime "
    "CPU (default threads, as the agent loads it), the session wrapped in a timer that adds up "
    "the time inside `session.infer`. job = `run` wall clock; runtime = the model calls inside "
    "it; pre/post = job - runtime; raw = the same model calls replayed straight on the session "
    "with the tensors the pipeline fed (captured once). Each run does the job, its raw replay "
    "and every sub-step once, interleaved; 2 warm-up runs, then as many runs as fit the budget. "
    "share = median over runs of pre/post / job. other work = busy CPU of other processes "
    "during the runs, share of all cores.",
]


# --- report ---------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v).replace("|", "/")


def markdown_section(results: dict[str, Any]) -> list[str]:
    pre = results.get("preprocess")
    if not pre:
        return []
    head = ["pipeline", "case", "job p50 ms", "runtime in job ms", "pre/post ms", "pre/post share",
            "raw p50 ms", "job / raw", "model calls", "runs", "other work", "sub-steps p50 ms"]
    md = ["## Pre- and post-processing per job (task pipelines)", "",
          f"Each pipeline's own work around the model, per job, beside the raw runtime calls "
          f"it makes, in this run ({pre.get('runtime')}). pre/post = job - runtime in job; raw = "
          "the same model calls replayed directly with the tensors the pipeline fed. Plot: "
          "`preprocess.png`.", "",
          "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    notes = []
    for c in pre.get("cases", []):
        steps = "; ".join(f"{k} {_cell(v)}" for k, v in c.get("steps_p50_ms", {}).items())
        if c.get("tokens_per_job"):
            steps += (f"{'; ' if steps else ''}per token: pre/post {_cell(c['pre_post_per_token_ms'])}, "
                      f"model {_cell(c['runtime_per_token_ms'])}")
        if c.get("runtime_by_model_p50_ms"):
            by = ", ".join(f"{r} {_cell(v)} ({c['model_calls_by_model'][r]} calls)"
                           for r, v in c["runtime_by_model_p50_ms"].items())
            steps += f"{'; ' if steps else ''}runtime by model: {by}"
        calls = c["model_calls_per_job"]
        calls_cell = f"{calls} (one: {_cell(c['raw_call_p50_ms'])} ms)" if calls > 1 else str(calls)
        md.append("| " + " | ".join([
            c["pipeline"], c["case"], _cell(c["job_p50_ms"]), _cell(c["runtime_in_job_p50_ms"]),
            _cell(c["pre_post_p50_ms"]), f"{c['pre_post_share'] * 100:.1f}%", _cell(c["raw_p50_ms"]),
            f"{c['job_vs_raw']:.2f}x" if c.get("job_vs_raw") else "-", calls_cell, str(c["runs"]),
            f"{c['other_cpu_share'] * 100:.0f}%" if "other_cpu_share" in c else "-", steps or "-"]) + " |")
        notes.append(f"- {c['pipeline']}, {c['case']}: {c['input']}; {c['model']}"
                     + (f"; {c['note']}" if c.get("note") else ""))
    for what, why in pre.get("skipped", {}).items():
        notes.append(f"- **{what}** not measured: {why}")
    return [*md, "", *notes, "", *pre.get("method", []), ""]


def plot(results: dict[str, Any], plt: Any, save: Callable[[Any, str], None]) -> None:
    """preprocess.png: per case, the job's p50 split into model calls and pre/post (shares)."""
    cases = (results.get("preprocess") or {}).get("cases") or []
    if not cases:
        return
    labels = [f"{c['pipeline']}\n{c['case']}" for c in cases]
    pre = [100 * c["pre_post_share"] for c in cases]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(cases) + 1.5))
    ys = list(range(len(cases)))[::-1]
    ax.barh(ys, [100 - p for p in pre], label="runtime (model calls)")
    ax.barh(ys, pre, left=[100 - p for p in pre], label="pre/post-processing")
    for y, c in zip(ys, cases, strict=True):
        ms = c["job_p50_ms"] or 0.0
        job = f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"
        ax.text(1, y, f"job p50 {job} ms, pre/post {c['pre_post_share'] * 100:.0f}%", va="center",
                fontsize=7, color="white")
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the job (median over runs), %")
    ax.set_title("Task pipelines: model calls vs pre/post-processing per job")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    save(fig, "preprocess.png")
