"""The performance targets, and a run's results as ratios against them (`Ratio`): what
`python -m bench` prints at the end and what latest.md's first table shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.raw import best_batch1

# The performance targets: issue 11's (the agent's CPU per job beside the bare echoes, its
# throughput and latency against the paho echo, the CNN against the raw runtime, memory and
# start-up), and issue 4's where issue 11 left them standing (vs the naive subscriber, the
# auto-tune's pick). Each ratio says which issue set its target.
CNN = "mobilenet"
SMALL = "digits"
LEVEL = 32
MODE = "binary"


@dataclass(frozen=True)
class Ratio:
    key: str
    what: str
    value: float | None
    target: str
    ok: bool | None
    detail: str
    issue: str = "11"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _point(results: dict[str, Any], section: str, model: str, mode: str, level: int
           ) -> dict[str, Any] | None:
    src = results.get("e2e", {}).get(section, {})
    entry = src.get("models", {}).get(model) if section == "agent" else src.get(model)
    if not entry:
        return None
    for p in entry.get("modes", {}).get(mode, {}).get("points", []):
        if p["concurrency"] == level and not p.get("skipped"):
            return dict(p)
    return None


def _judge(value: float | None, target: float, higher: bool) -> bool | None:
    if value is None:
        return None
    return value >= target if higher else value <= target


def ratios(results: dict[str, Any]) -> list[Ratio]:
    out: list[Ratio] = []
    raw = results.get("raw", {})
    agent_models = results.get("e2e", {}).get("agent", {}).get("models", {})

    # 1. e2e throughput / best raw batch-1 throughput (CNN, 32 in flight, binary)
    e2e = _point(results, "agent", CNN, MODE, LEVEL)
    best = best_batch1(raw.get(CNN, {}).get("runtimes", {})) if CNN in raw else None
    value = e2e["throughput"] / best[0] if e2e and best and e2e["completed"] else None
    chosen = agent_models.get(CNN, {})
    same = _same_runtime_best(raw.get(CNN, {}).get("runtimes", {}), chosen.get("runtime"),
                              chosen.get("precision"))
    detail = (f"{e2e['throughput']:.1f} jobs/s through the agent ({where_served(chosen)}) vs "
              f"{best[0]:.1f} inf/s raw ({best[1]})" if e2e and best else "not measured")
    if e2e and same:
        detail += (f"; vs the raw figure of the agent's own runtime and precision ({same[1]}, "
                   f"{same[0]:.1f} inf/s): {e2e['throughput'] / same[0]:.2f}x")
    batched = _point(results, "agent", f"{CNN}_b8", MODE, LEVEL)
    if batched and best:
        detail += (f"; with the agent's batching on (max_batch 8, {CNN}_b8): "
                   f"{batched['throughput']:.1f} jobs/s = {batched['throughput'] / best[0]:.2f}x")
    out.append(Ratio("e2e_vs_raw", f"e2e / best raw batch-1 throughput ({CNN} 224x224, auto-tuned, "
                     f"{LEVEL} in flight, {MODE})", _r(value), ">= 0.85x", _judge(value, 0.85, True),
                     detail))

    # 2. digits e2e / transport echo, same concurrency
    agent_p = _point(results, "agent", SMALL, MODE, LEVEL)
    echo_p = _point(results, "transport", SMALL, MODE, LEVEL)
    value = (agent_p["throughput"] / echo_p["throughput"]
             if agent_p and echo_p and echo_p["throughput"] else None)
    out.append(Ratio(
        "digits_vs_echo", f"{SMALL} e2e / paho echo throughput (QoS 1, {LEVEL} in flight, {MODE})",
        _r(value), ">= 1.0x", _judge(value, 1.0, True),
        f"{agent_p['throughput']:.0f} vs {echo_p['throughput']:.0f} jobs/s"
        if agent_p and echo_p else "not measured"))

    # 3. p50 overhead over the transport, one job in flight
    agent_1 = _point(results, "agent", SMALL, MODE, 1)
    echo_1 = _point(results, "transport", SMALL, MODE, 1)
    value = (agent_1["p50_ms"] - echo_1["p50_ms"]
             if agent_1 and echo_1 and agent_1["p50_ms"] is not None and echo_1["p50_ms"] is not None
             else None)
    out.append(Ratio(
        "p50_overhead_ms", f"p50 latency over the paho echo's ({SMALL}, 1 in flight, {MODE})",
        _r(value, 3), "<= +0.15 ms", _judge(value, 0.15, False),
        f"agent p50 {agent_1['p50_ms']:.3f} ms vs echo p50 {echo_1['p50_ms']:.3f} ms "
        f"(agent says infer {agent_1.get('agent_infer_ms_p50')} ms, queue "
        f"{agent_1.get('agent_queue_ms_p50')} ms)" if agent_1 and echo_1 else "not measured"))

    # 4. agent / naive baseline (CNN, 32 in flight)
    naive_pts = results.get("e2e", {}).get("naive", {}).get("points", [])
    naive_p = next((p for p in naive_pts if p["concurrency"] == LEVEL), None)
    value = (e2e["throughput"] / naive_p["throughput"]
             if e2e and naive_p and naive_p["throughput"] else None)
    out.append(Ratio(
        "vs_naive", f"agent / naive paho+ONNX Runtime subscriber ({CNN}, {LEVEL} in flight)",
        _r(value), ">= 2x", _judge(value, 2.0, True),
        f"agent {e2e['throughput']:.1f} jobs/s ({MODE}) vs naive {naive_p['throughput']:.1f} jobs/s "
        "(JSON + base64)" if e2e and naive_p else "not measured", issue="4"))

    # 5. auto-tune's pick against the best raw runtime, per reference model
    value, detail = _autotune_vs_raw(results)
    out.append(Ratio(
        "autotune_vs_raw", "auto-tune's pick vs the fastest eligible raw runtime, batch-1 p50 (worst model)",
        _r(value), ">= 0.9x", _judge(value, 0.9, True), detail, issue="4"))

    # 6. idle RSS with one small model
    mem = results.get("e2e", {}).get("memory", {})
    value = mem.get("idle_one_small_model_mb")
    out.append(Ratio("idle_rss_mb", f"agent RSS idle with one small model ({SMALL})", value,
                     "<= 150 MB", _judge(value, 150.0, False),
                     f"USS {mem.get('idle_one_small_model_uss_mb')} MB; peak under load "
                     f"{mem.get('peak_under_load_mb')} MB (mobilenet load peak "
                     f"{mem.get('peak_mobilenet_load_mb')} MB)" if value is not None else "not measured",
                     issue="4, 11"))

    # 7. process start to retained online, no models
    start = results.get("e2e", {}).get("startup", {})
    value = start.get("median_s")
    out.append(Ratio("start_to_online_s", "process start to retained `online` (no models)", value,
                     "<= 1 s", _judge(value, 1.0, False),
                     f"median of {start.get('runs_s')}" if value is not None else "not measured"))
    out += cpu_ratios(results)
    return out


def cpu_ratios(results: dict[str, Any]) -> list[Ratio]:
    """Issue 11's CPU per job targets, from the cpu part (bench/jobcpu.py)."""
    cpu = results.get("cpu", {})
    level = cpu.get("level", LEVEL)
    tiny = cpu.get("summary", {}).get("tiny", {})
    tensor = cpu.get("summary", {}).get("tensor", {})
    agent, paho = tiny.get("agent_cpu_ms"), tiny.get("paho_echo_cpu_ms")
    seen = (f"agent {agent} ms/job, paho echo {paho}, codec echo {tiny.get('codec_echo_cpu_ms')}"
            if agent is not None else "not measured")
    beyond, t_paho = tensor.get("agent_beyond_runtime_ms"), tensor.get("paho_echo_cpu_ms")
    how = (f"agent {tensor.get('agent_cpu_ms')} ms/job - runtime {tensor.get('runtime_cpu_ms')} "
           f"ms/call (process CPU of a direct call) = {beyond}; paho echo {t_paho}, codec echo "
           f"{tensor.get('codec_echo_cpu_ms')} ms/job" if beyond is not None else "not measured")
    ratio = tiny.get("agent_vs_paho_echo")
    t_ratio = tensor.get("agent_beyond_runtime_vs_paho_echo")
    return [
        Ratio("cpu_tiny_ms", f"agent CPU per {SMALL} job ({level} in flight, binary)", agent,
              "<= 0.30 ms", _judge(agent, 0.30, False), seen),
        Ratio("cpu_tiny_vs_echo", f"agent / paho echo CPU per {SMALL} job ({level} in flight)",
              ratio, "<= 1.6x", _judge(ratio, 1.6, False), seen),
        Ratio("cpu_600k_ms", f"agent CPU per 600 KB tensor job beyond the runtime's ({level} in "
              "flight, binary)", beyond, "<= 0.60 ms", _judge(beyond, 0.60, False), how),
        Ratio("cpu_600k_vs_echo", "agent CPU per 600 KB job beyond the runtime / paho echo CPU "
              "per job", t_ratio, "<= 0.3x", _judge(t_ratio, 0.3, False), how),
    ]


def _raw_label(runtime: str | None, precision: str | None) -> str | None:
    if runtime == "openvino":
        return f"openvino-{precision or 'f32'}"
    return runtime if runtime == "onnxruntime" else None


def _raw_b1(runtimes: dict[str, Any], label: str) -> float | None:
    """Raw batch-1 p50 per call in ms, one thread (what the auto-tune compares); None where
    not measured or measured on a twin model file (`model_file`: OpenVINO runs silero's
    If-less export, not the agent's)."""
    entry = runtimes.get(label) or {}
    b1 = (entry.get("batches") or {}).get("1")
    if not b1 or "error" in b1 or entry.get("model_file"):
        return None
    return float(b1["p50_ms"])


def _autotune_vs_raw(results: dict[str, Any]) -> tuple[float | None, str]:
    """For each deployed model: the speed (raw batch-1 p50, one thread) of the runtime and
    precision the agent's auto-tune chose, against the best raw one among the candidates the
    auto-tune found workable and in agreement with the f32 reference (a bf16 that disagrees
    is not eligible; nor is a raw figure taken on a twin model file, `model_file`)."""
    raw = results.get("raw", {})
    parts: list[str] = []
    worst: float | None = None
    for name, d in results.get("e2e", {}).get("deploys", {}).items():
        runtimes = raw.get(name, {}).get("runtimes", {})
        chosen = _raw_label(d.get("runtime"), d.get("precision"))
        if not d.get("ok") or not runtimes or chosen is None:
            continue
        eligible = {_raw_label(c["runtime"], c.get("precision")) for c in d.get("candidates", [])
                    if c.get("ok") and c.get("agrees") is not False}
        eligible.add(chosen)

        figures = {lab: v for lab in eligible if lab and (v := _raw_b1(runtimes, lab)) is not None}
        if chosen not in figures:
            parts.append(f"{name}: chose {chosen}, no raw figure for it")
            continue
        best_label = min(figures, key=lambda k: figures[k])
        ratio = figures[best_label] / figures[chosen]  # speed of the pick over the best's
        worst = ratio if worst is None else min(worst, ratio)
        parts.append(f"{name}: {chosen} p50 {figures[chosen]:.3g} ms vs best {best_label} "
                     f"{figures[best_label]:.3g} ms = {ratio:.2f}")
    return worst, "; ".join(parts) if parts else "not measured"


def where_served(entry: dict[str, Any]) -> str:
    """`runtime/device` and the precision, if any, of a deploy or a served model's entry."""
    precision = f" {entry['precision']}" if entry.get("precision") else ""
    return f"{entry.get('runtime')}/{entry.get('device')}{precision}"


def _same_runtime_best(runtimes: dict[str, Any], agent_runtime: str | None,
                       precision: str | None) -> tuple[float, str] | None:
    if agent_runtime == "openvino":
        label = f"openvino-{precision or 'f32'}"
    elif agent_runtime == "onnxruntime":
        label = "onnxruntime"
    else:
        return None
    entry = runtimes.get(label)
    return best_batch1({label: entry}) if entry else None


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def ratio_lines(rs: list[Ratio]) -> list[str]:
    lines = []
    for r in rs:
        mark = "n/a" if r.ok is None else ("MET" if r.ok else "MISSED")
        val = "n/a" if r.value is None else f"{r.value:g}"
        lines.append(f"{r.key:18s} {val:>9s}  target {r.target:11s} {mark:6s}  {r.what} "
                     f"(issue {r.issue})")
    return lines
