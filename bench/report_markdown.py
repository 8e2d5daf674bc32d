"""latest.md: a run's results as markdown, section by section (the ratios against the
targets first, then raw runtimes, pre/post-processing, end to end, CPU per job, start-up
and memory, the profiles, and how it was measured)."""

from __future__ import annotations

from typing import Any

from bench.int8 import markdown_section as _int8_section
from bench.lazy import markdown_section as _lazy_section
from bench.preprocess import markdown_section as _preprocess_section
from bench.targets import LEVEL, Ratio, where_served


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
    md += _int8_section(results)
    md += _preprocess_section(results)
    md += _e2e_section(results)
    md += cpu_section(results)
    md += _resources_section(results)
    md += _lazy_section(results.get("lazy"))
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
        md.append(f"### {name} on {where_served(entry)} (the agent's choice)")
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
    rows = [[name, d["ok"], d["seconds"], where_served(d), d["size_bytes"],
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
