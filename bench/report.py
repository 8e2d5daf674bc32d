"""Ratios against the targets, and the results as JSON, markdown tables and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.preprocess import markdown_section as _preprocess_section
from bench.preprocess import plot as _preprocess_plot
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
    detail = (f"{e2e['throughput']:.1f} jobs/s through the agent ({_where(chosen)}) vs "
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


def _where(entry: dict[str, Any]) -> str:
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


# --- markdown -------------------------------------------------------------------------------


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


def other_work(results: dict[str, Any]) -> tuple[float, float] | None:
    """Median and max share of the machine's cores busy with other work during points."""
    shares = []
    for entry in results.get("raw", {}).values():
        for rt in entry.get("runtimes", {}).values():
            shares += [b["other_cpu_share"] for b in (rt.get("batches") or {}).values()
                       if "other_cpu_share" in b]
    e2e = results.get("e2e", {})
    groups = [m.get("modes", {}) for m in e2e.get("agent", {}).get("models", {}).values()]
    groups += [m.get("modes", {}) for m in e2e.get("transport", {}).values()]
    for modes in groups:
        for m in modes.values():
            shares += [p["other_cpu_share"] for p in m["points"] if "other_cpu_share" in p]
    shares += [p["other_cpu_share"] for p in e2e.get("naive", {}).get("points", [])
               if "other_cpu_share" in p]
    shares += [p["other_cpu_share"] for job in results.get("cpu", {}).get("jobs", {}).values()
               for p in job.get("points", {}).values() if "other_cpu_share" in p]
    if not shares:
        return None
    shares.sort()
    return shares[len(shares) // 2], shares[-1]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    # A short row (a skipped point) leaves its other cells empty.
    out += ["| " + " | ".join([_fmt(c) for c in row] + [""] * (len(head) - len(row))) + " |"
            for row in rows]
    return out


def markdown(results: dict[str, Any], rs: list[Ratio]) -> str:
    meta = results["meta"]
    md: list[str] = [
        "# edgeinfer benchmarks",
        "",
        f"Run `{meta['command']}` at {meta['started_at']} ({meta['mode']} run, "
        f"{meta['duration_s']:.0f} s) on {meta['machine']['cpu']} ({meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gb']} GB; bf16: {meta['machine']['bf16']}), "
        f"commit {meta['git']}.",
        "",
        "**Figures vary from run to run and from machine to machine: compare figures only "
        "within one run.** Everything here was measured in this one run, on this one machine, "
        "with the load generator, the broker and the agent sharing its cores.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        *_quiet_lines(results),
        "## Ratios against the targets",
        "",
    ]
    md += _table(["ratio", "value", "target", "", "issue", "how"],
                 [[r.what, r.value, r.target, "n/a" if r.ok is None else ("met" if r.ok else "**missed**"),
                   r.issue, r.detail] for r in rs])
    md += ["", "Plots: `raw_batch1.png`, `e2e_throughput.png`, `e2e_latency.png`.", ""]
    md += _raw_section(results)
    md += _preprocess_section(results)
    md += _e2e_section(results)
    md += cpu_section(results)
    md += _resources_section(results)
    md += _profile_section(results)
    md += _method_section(results)
    return "\n".join(md) + "\n"


def _quiet_lines(results: dict[str, Any]) -> list[str]:
    load = results["meta"].get("load_average", {})
    other = other_work(results)
    if other is None:
        return []
    line = (f"Other work on the machine (busy CPU that neither the bench, the broker nor the "
            f"agent used, share of all cores, per point): median {other[0] * 100:.0f}%, max "
            f"{other[1] * 100:.0f}%; load average {load.get('start')} at the start, "
            f"{load.get('end')} at the end.")
    if other[1] > 0.1:
        line += (" **Some points shared the machine with other work: their figures are "
                 "lower than a quiet machine gives (column 'other work').**")
    return [line, ""]


def _raw_section(results: dict[str, Any]) -> list[str]:
    md = ["## Raw runtimes (direct calls, no agent)", "",
          "p50/p99 per call on one thread; throughput in items/s (batch x calls/s) on one "
          "thread and on two threads at once.", ""]
    rows = []
    notes = []
    for name, entry in results.get("raw", {}).items():
        if entry.get("skipped"):
            notes.append(f"- **{name}** skipped: {entry['skipped']}")
            continue
        for label, rt in entry["runtimes"].items():
            if rt.get("status") != "ok":
                rows.append([name, label, "-", rt.get("status"), "-", "-", "-", "-", "-"])
                notes.append(f"- **{name}** on {label}: {rt.get('status')}: {rt.get('reason')}")
                continue
            if rt.get("note"):
                notes.append(f"- **{name}** on {label}: runs `{rt.get('model_file')}`: {rt['note']}")
            for b, r in rt["batches"].items():
                if "error" in r:
                    rows.append([name, label, b, f"error: {r['error']}", "-", "-", "-", "-", "-"])
                    continue
                rows.append([name, label, b, r["p50_ms"], r["p99_ms"], r["throughput_items_s"],
                             r["threads2_items_s"], r["iterations"], r["first_run_ms"],
                             _pct(r.get("other_cpu_share"))])
    md += _table(["model", "runtime", "batch", "p50 ms", "p99 ms", "items/s (1 thread)",
                  "items/s (2 threads)", "runs", "first run ms", "other work"], rows)
    md += ["", *sorted(set(notes)), ""]
    return md


def _e2e_rows(points: list[dict[str, Any]], *, agent: bool) -> list[list[Any]]:
    rows = []
    for p in points:
        if p.get("skipped"):
            rows.append([p["concurrency"], p["skipped"]])
            continue
        row = [p["concurrency"], p["throughput"], p["p50_ms"], p["p99_ms"], p["completed"],
               p["errors"]]
        if agent:
            row += [p.get("agent_infer_ms_p50"), p.get("agent_queue_ms_p50"),
                    p.get("target_cpu_ms_per_job"), p.get("rss_peak_mb")]
        else:
            row += [p.get("target_cpu_ms_per_job")]
        row += [p.get("client_cpu_ms_per_job"), _pct(p.get("other_cpu_share"))]
        rows.append(row)
    return rows


def _e2e_section(results: dict[str, Any]) -> list[str]:
    e2e = results.get("e2e", {})
    md = ["## End to end through the agent and mosquitto", "",
          "Closed loop: N jobs in flight, each answer sends the next. Latency is publish to "
          "answer at the client. `infer`/`queue` are the agent's own figures from the answers "
          "(p50); CPU is per answer inside the window.", ""]
    for name, entry in e2e.get("agent", {}).get("models", {}).items():
        md.append(f"### {name} on {_where(entry)} (the agent's choice)")
        md.append("")
        if entry.get("error"):
            md += [f"Not served: {entry['error']}", ""]
            continue
        for mode, m in entry.get("modes", {}).items():
            md.append(f"{mode} payloads, request {m['request_bytes']:,} bytes:")
            md.append("")
            md += _table(["in flight", "jobs/s", "p50 ms", "p99 ms", "answers", "errors",
                          "agent infer ms", "agent queue ms", "agent CPU ms/job", "agent RSS peak MB",
                          "client CPU ms/job", "other work"], _e2e_rows(m["points"], agent=True))
            errs = {p.get("error_sample") for p in m["points"] if p.get("error_sample")}
            md += [""] + [f"- error seen: {e}" for e in sorted(errs)] + ([""] if errs else [])
    md += ["## The MQTT transport alone (echo responder, QoS 1)", "",
           "A plain paho responder answering each job with the agent's own answer bytes "
           "(captured from the agent), no inference: the ceiling for the agent.", ""]
    for name, entry in e2e.get("transport", {}).items():
        for mode, m in entry.get("modes", {}).items():
            md.append(f"{name} {mode} bytes (request {m['request_bytes']:,}, answer "
                      f"{m['answer_bytes']:,} bytes):")
            md.append("")
            md += _table(["in flight", "jobs/s", "p50 ms", "p99 ms", "answers", "errors",
                          "echo CPU ms/job", "client CPU ms/job", "other work"],
                         _e2e_rows(m["points"], agent=False))
            md.append("")
    naive = e2e.get("naive", {})
    if naive:
        md += ["## Naive baseline", "",
               f"paho subscriber running {naive['runtime']} on `{naive['model']}`, "
               f"{naive['payload']}, answering at QoS 1.", ""]
        md += _table(["in flight", "jobs/s", "p50 ms", "p99 ms", "answers", "errors",
                      "its CPU ms/job", "client CPU ms/job", "other work"],
                     _e2e_rows(naive["points"], agent=False))
        md.append("")
    return md


_RESPONDER_TITLES = {"agent": "edge-agent", "paho_echo": "paho echo (bench/echo.py)",
                     "codec_echo": "codec echo (bench/codec_echo.py, mqtt5 codec)"}


def cpu_section(results: dict[str, Any]) -> list[str]:
    """The cpu part: each responder's CPU per job, the agent's over each echo's."""
    cpu = results.get("cpu", {})
    if not cpu:
        return []
    level = cpu.get("level", LEVEL)
    md = ["## CPU per job: the agent beside bare responders", "",
          f"{level} jobs in flight, binary OIP, QoS 1 both ways; one mosquitto and one load "
          "generator for all three responders, one after the other. CPU = user+system time of "
          "the responding process (all its threads) over the window, per answer in it; the "
          "broker's and the load generator's are beside it, so neither hides in the "
          "comparison. The echoes answer with the agent's own answer bytes, without decoding "
          "the job.", ""]
    if cpu.get("error"):
        md += [f"**The part failed:** {cpu['error']}", ""]
    summary = cpu.get("summary", {})
    for key, job in cpu.get("jobs", {}).items():
        s = summary.get(key, {})
        dep = job.get("deploy", {})
        md += [f"### {job.get('title')}: request {job.get('request_bytes', 0):,} bytes, answer "
               f"{job.get('answer_bytes', 0):,} bytes ({dep.get('runtime')}/{dep.get('device')} "
               "in the agent)", ""]
        rows = []
        agent_cpu = s.get("agent_cpu_ms")
        for who, p in job.get("points", {}).items():
            mine = p.get("target_cpu_ms_per_job")
            rows.append([_RESPONDER_TITLES.get(who, who), p.get("throughput"), p.get("p50_ms"),
                         mine, "-" if who == "agent" or not mine or agent_cpu is None
                         else f"{agent_cpu / mine:.2f}x", p.get("broker_cpu_ms_per_job"),
                         p.get("client_cpu_ms_per_job"), p.get("errors"),
                         _pct(p.get("other_cpu_share"))])
        md += _table(["responder", "jobs/s", "p50 ms", "CPU ms/job", "agent / this",
                      "broker CPU ms/job", "client CPU ms/job", "errors", "other work"], rows)
        md.append("")
        rt = job.get("runtime_cpu") or {}
        if "error" in rt:
            md.append(f"- The runtime alone could not be timed: {rt['error']}")
        elif rt:
            agent_p = job.get("points", {}).get("agent", {})
            md.append(f"- The runtime alone ({rt.get('runtime')}/{rt.get('device')} "
                      f"{rt.get('precision') or ''}, the deployed model called directly on the "
                      f"agent's backend): {rt.get('cpu_ms_per_call')} ms CPU per call "
                      f"(time.process_time over {rt.get('calls')} calls in one thread; the "
                      f"calling thread {rt.get('caller_thread_cpu_ms_per_call')} ms, wall "
                      f"{rt.get('wall_ms_per_call')} ms). The agent's own `infer_ms` p50 under "
                      f"this load: {agent_p.get('agent_infer_ms_p50')} ms, wall time with waits "
                      "for a core in it, so not what is subtracted.")
            md.append(f"- The agent beyond the runtime: {s.get('agent_beyond_runtime_ms')} ms "
                      f"CPU per job = {s.get('agent_beyond_runtime_vs_paho_echo')}x the paho "
                      f"echo's; the agent over the paho echo {s.get('agent_vs_paho_echo')}x, "
                      f"over the codec echo {s.get('agent_vs_codec_echo')}x.")
        threads = job.get("points", {}).get("agent", {}).get("target_threads_cpu_ms_per_job")
        if threads:
            md.append("- The agent's CPU ms/job by thread: "
                      + ", ".join(f"{k} {v}" for k, v in threads.items()))
        errs = {p.get("error_sample") for p in job.get("points", {}).values()
                if p.get("error_sample")}
        md += [f"- error seen: {e}" for e in sorted(errs)]
        md.append("")
    return md


def _resources_section(results: dict[str, Any]) -> list[str]:
    e2e = results.get("e2e", {})
    start = e2e.get("startup", {})
    mem = e2e.get("memory", {})
    md = ["## Start-up, deploys, memory", "",
          f"- Process start to retained `online`, no models: median {start.get('median_s')} s "
          f"(runs: {start.get('runs_s')}); RSS then {start.get('rss_no_models_mb')} MB.",
          f"- Agent RSS idle with `digits` alone: {mem.get('idle_one_small_model_mb')} MB "
          f"(USS {mem.get('idle_one_small_model_uss_mb')} MB); with every model loaded: "
          f"{mem.get('idle_all_models_mb')} MB; peak under load: {mem.get('peak_under_load_mb')} MB "
          f"(mobilenet load: {mem.get('peak_mobilenet_load_mb')} MB).", ""]
    rows = [[name, d["ok"], d["seconds"], _where(d), d["size_bytes"],
             (d.get("autotune") or {}).get("tuning_s"),
             _candidates(d) if d.get("candidates") else "; ".join(
                 f"{a.get('runtime')}/{a.get('device')}: {_short(a.get('reason'))}"
                 for a in d.get("attempts", []) if not a.get("ok")) or "-"]
            for name, d in e2e.get("deploys", {}).items()]
    md += ["Manifest published to model serving (deploy API, `--wait`; includes the agent's "
           "auto-tune when it tunes):", ""]
    md += _table(["model", "serving", "seconds", "serving on", "bytes", "auto-tune s",
                  "auto-tune candidates (p50 ms), else runtimes passed over"], rows)
    md.append("")
    return md


def _candidates(deploy: dict[str, Any]) -> str:
    out = []
    for c in deploy.get("candidates") or []:
        where = f"{c.get('runtime')}/{c.get('device')} {c.get('precision') or ''}".strip()
        if c.get("ok"):
            agrees = "" if c.get("agrees", True) else ", disagrees"
            out.append(f"{where}: {c.get('p50_ms')}{agrees}")
        else:
            out.append(f"{where}: {_short(c.get('reason'))}")
    return "; ".join(out) or "-"


def _short(text: str | None, limit: int = 110) -> str:
    text = (text or "").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _profile_section(results: dict[str, Any]) -> list[str]:
    prof = results.get("e2e", {}).get("profile", {})
    if not prof:
        return []
    md = ["## Where the agent's time goes (py-spy, extra runs)", "",
          "Each profiled point ran once more under `py-spy record --idle` after its measured "
          "run (the sampler costs CPU, so these figures are not the table's). Per thread: share "
          "of samples by innermost agent frame > leaf frame.", ""]
    for tag, p in prof.items():
        md.append(f"### {tag}")
        md.append("")
        if "error" in p:
            md += [f"py-spy: {p['error']}", ""]
            continue
        pt = p.get("point_under_profiler", {})
        md.append(f"Under the profiler: {pt.get('throughput')} jobs/s, agent CPU "
                  f"{pt.get('target_cpu_ms_per_job')} ms/job; per thread (ms/job): "
                  f"{pt.get('target_threads_cpu_ms_per_job')}. Raw stacks: `{p.get('raw_stacks')}`.")
        md.append("")
        for thread, lines in p.get("threads", {}).items():
            md.append(f"- `{thread}`: " + "; ".join(line.strip() for line in lines[:4]))
        md.append("")
    return md


def _method_section(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    return ["## How it was measured", "",
            *[f"- {line}" for line in meta.get("method", [])], ""]


# --- plots ------------------------------------------------------------------------------------


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # Raw batch-1 throughput by model and runtime.
    raw = {k: v for k, v in results.get("raw", {}).items() if not v.get("skipped")}
    if raw:
        labels = ["onnxruntime", "openvino-f32", "openvino-bf16"]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = []
            for entry in raw.values():
                b1 = entry["runtimes"].get(label, {}).get("batches", {}).get("1", {})
                values.append(b1.get("throughput_items_s") or 0.0)
            ax.bar([x + i * width for x in range(len(raw))], values, width, label=label)
        ax.set_xticks([x + width for x in range(len(raw))], list(raw))
        ax.set_yscale("log")
        ax.set_ylabel("inferences/s, batch 1, one thread")
        ax.set_title("Raw runtimes (missing bar: cannot load or skipped)")
        ax.legend()
        save(fig, "raw_batch1.png")

    agent = results.get("e2e", {}).get("agent", {}).get("models", {})
    served = {k: v for k, v in agent.items() if v.get("modes")}
    if served:
        for metric, fname, ylabel in (("throughput", "e2e_throughput.png", "jobs/s"),
                                      ("p50_ms", "e2e_latency.png", "p50 latency, ms")):
            cols = min(3, len(served))
            rows = (len(served) + cols - 1) // cols
            fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
            for ax, (name, entry) in zip(axes.flat, served.items(), strict=False):
                _series(ax, entry, results, name, metric)
                precision = f" {entry['precision']}" if entry.get("precision") else ""
                ax.set_title(f"{name} ({entry.get('runtime')}{precision})")
                ax.set_xscale("log", base=2)
                levels = sorted({p["concurrency"] for m in entry.get("modes", {}).values()
                                 for p in m["points"]})
                ax.set_xticks(levels, [str(v) for v in levels])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_yscale("log")
                ax.set_xlabel("jobs in flight")
                ax.set_ylabel(ylabel)
                ax.legend(fontsize=7)
            for ax in list(axes.flat)[len(served):]:
                ax.axis("off")
            save(fig, fname)
    _preprocess_plot(results, plt, save)
    return written


def _series(ax: Any, entry: dict[str, Any], results: dict[str, Any], name: str, metric: str) -> None:
    def line(points: list[dict[str, Any]], label: str, style: str) -> None:
        xs = [p["concurrency"] for p in points if p.get(metric)]  # skipped points have none
        ys = [p[metric] for p in points if p.get(metric)]
        if xs:
            ax.plot(xs, ys, style, label=label)

    for mode, m in entry.get("modes", {}).items():
        line(m["points"], f"agent {mode}", "o-")
    echo = results.get("e2e", {}).get("transport", {}).get(name, {})
    for mode, m in echo.get("modes", {}).items():
        line(m["points"], f"echo {mode}", "x--")
    naive = results.get("e2e", {}).get("naive", {})
    if naive.get("model") == name:
        line(naive["points"], "naive", "s:")
    if metric == "throughput":
        same = results.get("models", {}).get(name, {}).get("same_model_as") or name
        best = best_batch1(results.get("raw", {}).get(same, {}).get("runtimes", {}))
        if best:
            ax.axhline(best[0], color="grey", linestyle=":", label=f"best raw b1 ({best[1]})")


def write(results: dict[str, Any], out: Path, say: Callable[[str], None]) -> list[Ratio]:
    out.mkdir(parents=True, exist_ok=True)
    rs = ratios(results)
    results["ratios"] = [r.as_dict() for r in rs]
    try:
        results["plots"] = plots(results, out)
    except ImportError as exc:
        results["plots"] = []
        say(f"no plots: {exc} (pip install matplotlib)")
    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "latest.md").write_text(markdown(results, rs))
    return rs
