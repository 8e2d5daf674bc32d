"""`python -m bench`: the raw runtimes, the agent end to end through mosquitto, the bare
transport and a naive baseline, all measured in one run on this machine.

Writes `<out>/latest.json`, `<out>/latest.md` and PNG plots, and prints the ratios against
the performance targets. Figures are only comparable within one run.

    python -m bench                 # the full run (~10 minutes on a 2-core gateway)
    python -m bench --quick         # a short one (~2 minutes)
    python -m bench --models digits mobilenet --out /tmp/bench
    python -m bench --only preprocess --out /tmp/bench   # one part alone (raw, preprocess, e2e, cpu)
    python -m bench --only lazy     # a lazy model's first job, added to <out>'s latest run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench import e2e, int8, jobcpu, lazy, points, preprocess, raw, refmodels, report

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("raw", "preprocess", "e2e", "cpu", "lazy")


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _mosquitto_version() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return "not found"
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].replace("mosquitto version ", "") if first else "unknown"


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "agent", "runtimes", "fleet"],
                               cwd=ROOT, capture_output=True, text=True, timeout=5,
                               check=False).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in agent/runtimes/fleet' if dirty else ''}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    bf16, why = raw.bf16_supported()
    return {"cpu": _cpu_name(), "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "bf16": "yes" if bf16 else f"no ({why})", "os": platform.platform(),
            "python": platform.python_version()}


def method(quick: bool, budget: raw.Budget, timing: points.Timing) -> list[str]:
    return [
        f"Raw: per model, runtime and batch (1, 8): {raw.WARMUP_RUNS} warm-up calls, then a fixed "
        f"number of timed calls chosen from the warm-up time to last ~{budget.budget_s:g} s "
        f"({budget.min_iters}..{budget.max_iters}) on one thread, then as many again split over "
        "two threads (one shared ONNX Runtime session; one OpenVINO compiled model with a "
        "request per thread). Default runtime thread settings, as the agent uses them.",
        f"INT8: {', '.join(int8.MODELS)} quantized as the agent does at deploy, timed like "
        "the raw runtimes, top-1 agreement with onnxruntime f32 on rows the calibration did "
        "not see (bench/int8.py).",
        "End to end: one mosquitto (fleet.localbroker.Broker: the reference config's "
        "max_inflight_messages 64, TCP_NODELAY) and one edge-agent process with its default "
        "config (2 job workers, runtime threads 0, queue 256, journal synchronous NORMAL), "
        "models deployed with the fleet's deploy API and the default runtime preference.",
        f"Closed loop per point: {timing.warmup_s:g} s warm-up (and at least one answer per "
        f"slot), then a window of >= {timing.measure_s:g} s holding >= one answer per slot, "
        f"cut at {timing.max_s:g} s; answers inside the window count. One "
        "edgeinfer.fleet.client.InferenceClient drives every target; request bodies come from the SDK's "
        "encoder once, only the job id changes per job.",
        "Transport echo: bench/echo.py, plain paho, MQTT v5, TCP_NODELAY, QoS 1 both ways, "
        "answering with the bytes the agent answered the same request with.",
        "Naive baseline: bench/naive.py, ONNX Runtime inside paho's on_message, JSON with "
        "base64 tensors, QoS 1 answer, TCP_NODELAY set.",
        f"CPU per job (bench/jobcpu.py): its own mosquitto and edge-agent; at {jobcpu.LEVEL} "
        "in flight, binary OIP, QoS 1 both ways, the digits job (~200 B) and a 600 KB tensor "
        "job (ReduceMean over 150,000 floats) go to the agent, then to the paho echo and to "
        "the codec echo (bench/codec_echo.py: mqtt5 codec, raw socket, one thread), both "
        "answering with the agent's answer bytes. CPU = utime+stime of the responding process "
        "(all threads; /proc/<pid>/stat via psutil) over the window / answers in it. The "
        "runtime's share: the deployed model on the agent's own backend, called directly "
        "(time.process_time per call over N calls in one thread, nothing else running, "
        "taking turns over copies of the input so that it is not all in cache): CPU, like "
        "the rest; not the agent's infer_ms, which is wall time under load, waits included.",
        "Memory: RSS (psutil) of the agent process; idle = 1.5 s after the only model "
        "(digits) serves; peak = highest 50 ms sample under load. Start-up: from Popen to "
        "the retained `online` state arriving at a subscriber, fresh state dir, no models.",
        "The load generator, mosquitto and the agent share this machine's cores: on a "
        "2-core machine the client's own CPU (column 'client CPU ms/job') is taken from the "
        "agent's share. Compare rows within this run only.",
        *(["--quick: shorter windows and budgets; noisier."] if quick else []),
    ]


def wait_quiet(limit_s: float, busy_below: float = 15.0, for_s: int = 8) -> bool:
    """Wait until the machine's CPU has been under `busy_below`% for `for_s` seconds in a
    row, or `limit_s` has passed; says which."""
    deadline = time.monotonic() + limit_s
    quiet, busy = 0, 100.0
    while time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
        quiet = quiet + 1 if busy < busy_below else 0
        if quiet >= for_s:
            say(f"machine idle ({busy:.0f}% busy); starting")
            return True
    say(f"machine still busy after {limit_s:g} s (last {busy:.0f}%); starting anyway")
    return False


def _lazy_alone(out: Path) -> int:
    """`--only lazy`: measured alone and added to the run already in <out> (latest.json),
    whose latest.md is written again with it; a short part, not worth a whole run."""
    work = Path(tempfile.mkdtemp(prefix="edgeinfer-bench-lazy-"))
    try:
        measured = lazy.run(work, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = out / "latest.json"
    stored: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if "meta" not in stored:
        say(f"no earlier run in {out}: run `python -m bench` first")
        return 1
    stored["lazy"] = {**measured, "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                      "git": _git()}
    report.write(stored, out, say)
    say(f"wrote the lazy section into {out / 'latest.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (~2 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks",
                        help="where latest.json, latest.md and the plots go (default: docs/benchmarks)")
    parser.add_argument("--models", nargs="+", metavar="NAME", choices=refmodels.ALL,
                        help=f"measure only these ({', '.join(refmodels.ALL)})")
    parser.add_argument("--skip-raw", action="store_true", help="leave out the raw runtimes")
    parser.add_argument("--skip-e2e", action="store_true",
                        help="leave out the agent, the echo and the naive baseline")
    parser.add_argument("--skip-preprocess", action="store_true",
                        help="leave out the task pipelines' pre-/post-processing per job")
    parser.add_argument("--skip-cpu", action="store_true",
                        help="leave out the CPU per job of the agent beside the bare echoes")
    parser.add_argument("--only", nargs="+", metavar="PART", choices=PARTS,
                        help=f"measure only these parts ({', '.join(PARTS)}): the --skip-* "
                             "flags of the others")
    parser.add_argument("--pipelines", nargs="+", metavar="TASK", choices=preprocess.PIPELINES,
                        help=f"preprocess part: only these ({', '.join(preprocess.PIPELINES)})")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="extra py-spy runs of the agent (default: on, off with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine to be idle (other "
                             "work skews every figure)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write latest.md and the plots again from "
                             "<out>/latest.json")
    args = parser.parse_args(argv)
    if args.only:
        args.skip_raw = "raw" not in args.only
        args.skip_preprocess = "preprocess" not in args.only
        args.skip_e2e = "e2e" not in args.only
        args.skip_cpu = "cpu" not in args.only
    if args.only == ["lazy"]:
        return _lazy_alone(args.out)
    if args.render:
        stored: dict[str, Any] = json.loads((args.out / "latest.json").read_text())
        for line in report.ratio_lines(report.write(stored, args.out, say)):
            print("  " + line)
        return 0

    if args.quick:
        budget = raw.Budget(0.15, 10, 1000)
        timing = points.Timing(warmup_s=0.3, measure_s=0.8, max_s=3.0, online_runs=1)
    else:
        budget = raw.Budget(1.0, 20, 5000)
        timing = points.Timing(warmup_s=0.5, measure_s=2.5, max_s=8.0, online_runs=3)
    profiling = (not args.quick) if args.profile is None else args.profile

    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    started = time.monotonic()
    failed: str | None = None
    work = Path(tempfile.mkdtemp(prefix="edgeinfer-bench-"))
    say(f"work folder {work}")
    results: dict[str, Any] = {"meta": {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": "quick" if args.quick else "full",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {"onnxruntime": _version("onnxruntime"), "openvino": _version("openvino"),
                     "paho-mqtt": _version("paho-mqtt"), "numpy": _version("numpy"),
                     "mosquitto": _mosquitto_version(),
                     "rapidocr-onnxruntime": _version("rapidocr-onnxruntime"),
                     "silero-vad": _version("silero-vad")},
        "git": _git(),
        "load_average": {"start": [round(x, 2) for x in os.getloadavg()]},
        "method": method(args.quick, budget, timing),
    }, "raw": {}, "e2e": {}}
    try:
        # The reference models feed the raw and end-to-end parts; preprocess builds its own.
        models = ([] if args.skip_raw and args.skip_e2e
                  else refmodels.build(work / "models", args.models))
        for m in models:
            if m.skipped:
                say(f"{m.name}: skipped: {m.skipped}")
        results["models"] = {m.name: {"title": m.title, "file": m.path.name if m.path else None,
                                      "openvino_file": m.ov_path.name if m.ov_path else None,
                                      "skipped": m.skipped or None, **m.info} for m in models}
        results["meta"]["sections_s"] = sections = {}
        t0 = time.monotonic()
        if not args.skip_raw:
            for m in models:
                if not m.raw:
                    continue
                if m.skipped:
                    results["raw"][m.name] = {"skipped": m.skipped}
                    continue
                results["raw"][m.name] = {"runtimes": raw.bench_model(m, budget, say)}
                if m.name in int8.MODELS:  # beside f32 and bf16: `quantize: int8`
                    (work / "int8").mkdir(exist_ok=True)
                    results["raw"][m.name]["int8"] = int8.bench_model(m, work / "int8",
                                                                      budget, say)
        sections["raw"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        if not args.skip_preprocess:
            results["preprocess"] = preprocess.run(
                work / "preprocess", preprocess.QUICK if args.quick else preprocess.FULL, say,
                args.pipelines)
            sections["preprocess"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        if not args.skip_e2e:
            levels = e2e.LEVELS
            profile_dir = args.out if profiling else None
            if profile_dir is not None:
                profile_dir.mkdir(parents=True, exist_ok=True)
                for old in profile_dir.glob("profile-*.txt"):
                    old.unlink()
            res = e2e.E2EResult()
            try:
                e2e.run(work / "e2e", [m for m in models if not m.skipped], timing, say,
                        levels=levels, profile_dir=profile_dir, res=res)
            except Exception as exc:
                # Keep what was measured; say what broke.
                failed = f"{type(exc).__name__}: {exc}"
                say(f"end-to-end part failed: {failed} (--keep keeps the logs)")
            results["e2e"] = res.as_dict()
            if failed:
                results["e2e"]["error"] = failed
            sections["e2e"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        if not args.skip_cpu:
            cpu: dict[str, Any] = {}
            results["cpu"] = cpu
            try:
                jobcpu.run(work / "cpu", timing, say, runtime_budget_s=budget.budget_s,
                           res=cpu)
            except Exception as exc:
                failed = (f"{failed}; " if failed else "") + f"cpu part: {type(exc).__name__}: {exc}"
                cpu["error"] = f"{type(exc).__name__}: {exc}"
                say(f"cpu part failed: {cpu['error']} (--keep keeps the logs)")
            cpu["summary"] = jobcpu.summary(cpu)
            sections["cpu"] = round(time.monotonic() - t0, 1)
        if args.only is None or "lazy" in args.only:
            t0 = time.monotonic()
            try:
                results["lazy"] = lazy.run(work / "lazy", say)
            except Exception as exc:
                results["lazy"] = {"error": f"{type(exc).__name__}: {exc}"}
                say(f"lazy part failed: {results['lazy']['error']}")
            sections["lazy"] = round(time.monotonic() - t0, 1)
    finally:
        results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
        results["meta"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
        if args.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    rs = report.write(results, args.out, say)
    say(f"wrote {args.out / 'latest.json'}, {args.out / 'latest.md'} and "
        f"{', '.join(results.get('plots', []))} in {results['meta']['duration_s']:.0f} s")
    print()
    print("Ratios (this run only; see latest.md for how each was measured):")
    for line in report.ratio_lines(rs):
        print("  " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
