"""The raw runtimes, called directly: ONNX Runtime (CPU) and OpenVINO (CPU, f32 and, where
the CPU has it, bf16 through INFERENCE_PRECISION_HINT).

For each model, runtime and batch (1 and 8): a few warm-up runs, then a fixed number of
timed runs on one thread (p50/p99 latency, throughput), then the same number on two
threads at once (throughput). Two threads share one ONNX Runtime session (its `run` is
thread-safe) or one compiled OpenVINO model with an infer request each: how the agent's two
job workers call a runtime. Sessions keep the runtime's default thread settings, as the
agent does (`runtime.threads: 0`). The number of runs is chosen from the warm-up time so
that each measurement takes about `budget_s`, between `min_iters` and `max_iters`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from bench.loadgen import percentiles_ms
from bench.refmodels import RefModel

BATCHES = (1, 8)
WARMUP_RUNS = 3

Runner = Callable[[], Any]


@dataclass(frozen=True)
class Budget:
    budget_s: float
    min_iters: int
    max_iters: int


def _ort_factory(path: str) -> tuple[Callable[[dict[str, np.ndarray[Any, Any]]], Runner], str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])

    def make(feed: dict[str, np.ndarray[Any, Any]]) -> Runner:
        return lambda: session.run(None, feed)

    return make, f"onnxruntime {ort.__version__} CPUExecutionProvider"


_core: Any = None


def ov_core() -> Any:
    global _core  # noqa: PLW0603
    if _core is None:
        import openvino as ov

        _core = ov.Core()
    return _core


def bf16_supported() -> tuple[bool, str]:
    try:
        caps = ov_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception as exc:
        return False, f"OpenVINO CPU capabilities unreadable: {exc}"
    if "BF16" in caps:
        return True, ""
    return False, f"this CPU has no bf16 support (OpenVINO CPU capabilities: {', '.join(caps)})"


def ov_error(exc: BaseException) -> str:
    from edgeinfer.runtimes.openvino_backend import condense_error

    return condense_error(str(exc))


def _ov_factory(path: str, precision: str) -> tuple[Callable[[dict[str, np.ndarray[Any, Any]]], Runner], str]:
    import openvino as ov

    compiled = ov_core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    hint = compiled.get_property("PERFORMANCE_HINT")
    streams = compiled.get_property("NUM_STREAMS")

    def make(feed: dict[str, np.ndarray[Any, Any]]) -> Runner:
        request = compiled.create_infer_request()  # one per thread, as the agent's pool does
        return lambda: request.infer(feed)  # by tensor name

    return make, f"openvino {ov.get_version().split('-')[0]} CPU {precision} (hint {hint}, streams {streams})"


def _time_one_thread(run: Runner, n: int) -> tuple[list[float], float]:
    times = []
    t_all = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times, time.perf_counter() - t_all


def _time_threads(runs: list[Runner], n_each: int) -> float:
    barrier = threading.Barrier(len(runs) + 1)
    errors: list[BaseException] = []

    def worker(run: Runner) -> None:
        barrier.wait()
        try:
            for _ in range(n_each):
                run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def measure_runner(make: Callable[[dict[str, np.ndarray[Any, Any]]], Runner],
                   feed: dict[str, np.ndarray[Any, Any]], batch: int, budget: Budget) -> dict[str, Any]:
    run = make(feed)
    t0 = time.perf_counter()
    run()
    first_ms = (time.perf_counter() - t0) * 1000
    warm = []
    for _ in range(WARMUP_RUNS):
        t0 = time.perf_counter()
        run()
        warm.append(time.perf_counter() - t0)
    est = max(float(np.median(warm)), 1e-6)
    n = int(min(max(budget.budget_s / est, budget.min_iters), budget.max_iters))
    me = psutil.Process()
    busy0, mine0, t_0 = busy_cpu_s(), _cpu(me), time.perf_counter()
    times, total = _time_one_thread(run, n)
    lat = percentiles_ms(times)
    n2 = max(n // 2, 1)
    runs2 = [run, make(feed)]
    runs2[1]()  # a second OpenVINO request's first call allocates: keep it out of the timing
    wall2 = _time_threads(runs2, n2)
    elsewhere = (busy_cpu_s() - busy0) - (_cpu(me) - mine0)
    other = max(0.0, elsewhere) / ((time.perf_counter() - t_0) * (psutil.cpu_count() or 1))
    return {
        "batch": batch, "iterations": n, "first_run_ms": round(first_ms, 3), **lat,
        "throughput_inf_s": round(n / total, 2),
        "throughput_items_s": round(n * batch / total, 2),
        "threads2_iterations": 2 * n2,
        "threads2_inf_s": round(2 * n2 / wall2, 2),
        "threads2_items_s": round(2 * n2 * batch / wall2, 2),
        "other_cpu_share": round(other, 3),
    }


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def runtime_configs() -> list[tuple[str, str | None, str]]:
    """(label, OpenVINO precision or None for ONNX Runtime, why skipped or '')."""
    ok, why = bf16_supported()
    return [("onnxruntime", None, ""), ("openvino-f32", "f32", ""),
            ("openvino-bf16", "bf16", "" if ok else why)]


def bench_model(model: RefModel, budget: Budget, say: Callable[[str], None]) -> dict[str, Any]:
    """Every runtime config and batch for one model: {label: {...}}."""
    assert model.path is not None and model.feed is not None
    out: dict[str, Any] = {}
    for label, precision, skip in runtime_configs():
        entry: dict[str, Any] = {}
        out[label] = entry
        if skip:
            entry["status"] = "skipped"
            entry["reason"] = skip
            continue
        path = model.path
        if precision is not None:
            if model.ov_path is None:
                entry["status"] = "cannot load"
                entry["reason"] = _ov_reason(model)
                continue
            if model.ov_path != model.path:
                entry["model_file"] = model.ov_path.name
                entry["note"] = model.ov_note
                entry["original_fails"] = _ov_reason(model)
            path = model.ov_path
        try:
            t0 = time.perf_counter()
            make, desc = _ort_factory(str(path)) if precision is None else _ov_factory(str(path), precision)
            entry["load_s"] = round(time.perf_counter() - t0, 3)
            entry["runtime"] = desc
        except Exception as exc:
            entry["status"] = "cannot load"
            entry["reason"] = ov_error(exc) if precision else str(exc).splitlines()[0]
            continue
        entry["status"] = "ok"
        entry["batches"] = {}
        for batch in BATCHES:
            try:
                r = measure_runner(make, model.feed(batch), batch, budget)
            except Exception as exc:
                entry["batches"][str(batch)] = {"batch": batch, "error": str(exc).splitlines()[0]}
                continue
            entry["batches"][str(batch)] = r
            say(f"raw {model.name:13s} {label:14s} b{batch}: p50 {r['p50_ms']:8.3f} ms  "
                f"p99 {r['p99_ms']:8.3f} ms  {r['throughput_items_s']:9.1f} items/s  "
                f"(2 threads {r['threads2_items_s']:9.1f})  n={r['iterations']}")
    return out


def _ov_reason(model: RefModel) -> str:
    """Why OpenVINO cannot read the model file itself."""
    assert model.path is not None
    try:
        ov_core().read_model(str(model.path))
    except Exception as exc:
        return ov_error(exc)
    return model.ov_note or "OpenVINO reads the model"


def best_batch1(results: dict[str, Any]) -> tuple[float, str] | None:
    """The highest batch-1 throughput over runtimes and 1 or 2 threads, and where."""
    best: tuple[float, str] | None = None
    for label, entry in results.items():
        b1 = (entry.get("batches") or {}).get("1")
        if not b1 or "error" in b1:
            continue
        for key, how in (("throughput_inf_s", "1 thread"), ("threads2_inf_s", "2 threads")):
            value = float(b1[key])
            if best is None or value > best[0]:
                best = (value, f"{label}, {how}")
    return best
