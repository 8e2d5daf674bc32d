"""CPU per job (`--only cpu`): the agent beside bare responders, measured in the same run.

On one mosquitto, with one load generator (the SDK's `InferenceClient`, as in the e2e
part), at `LEVEL` jobs in flight and QoS 1 both ways, two binary OIP jobs go to three
responders, one after the other:

- the agent (`edge-agent`, default config), serving the digits MLP (the tiny job, ~200 B
  of tensor) and a ReduceMean over 150,000 floats (the 600 KB tensor job), each deployed
  with the fleet's deploy API;
- the paho echo (bench/echo.py) and the codec echo (bench/codec_echo.py), each answering
  the same jobs with the bytes the agent answered them with, without decoding them.

For each responder and job: user+system CPU of the responding process (all its threads:
/proc/<pid>/stat utime+stime, read through psutil) over the measuring window, divided by
the answers that arrived in it; the broker's and the load generator's the same way. The
runtime's own share of the agent's: the model called directly (the agent's own backend,
runtime, device and precision as deployed) on the same input, time.process_time of this
process over N calls in one thread while nothing else runs here. That is the CPU a call
costs, the runtime's pool threads included; the agent's `infer_ms` is wall time under load
(waits for a core count), so it is shown beside it, not subtracted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import agent_steps, loadgen, models, points, profile, refmodels, subprocs
from bench.codec_echo import READY as CODEC_ECHO_READY
from bench.echo import READY as ECHO_READY
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.localbroker import Broker
from edgeinfer.fleet.mqtt import connect

LEVEL = 32
TENSOR_FLOATS = 150_000
DEVICE = "bench-cpu-gw"
RESPONDERS = ("agent", "paho_echo", "codec_echo")
TITLES = {"agent": "edge-agent", "paho_echo": "paho echo (bench/echo.py)",
          "codec_echo": "codec echo (bench/codec_echo.py)"}

Say = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    key: str  # "tiny" | "tensor"
    title: str
    model: refmodels.RefModel


def jobs(work: Path) -> list[Job]:
    digits, _probs = refmodels.digits(work)
    x = np.random.default_rng(1234).random((1, TENSOR_FLOATS), dtype=np.float32)
    tensor = refmodels.RefModel(
        "reduce_mean", f"ReduceMean over {TENSOR_FLOATS:,} floats", models.build_reduce_mean(
            work, size=TENSOR_FLOATS), feed=lambda b: {"x": x[:b]}, modes=("binary",),
        info={"input": f"x FP32 [N,{TENSOR_FLOATS}]"})
    return [Job("tiny", "digits MLP, 64 floats (~200 B job)", digits),
            Job("tensor", f"ReduceMean over {TENSOR_FLOATS:,} floats (600 KB job)", tensor)]


def runtime_cpu(path: Path, runtime: str, device: str, precision: str | None,
                feed: dict[str, np.ndarray[Any, Any]], budget_s: float,
                max_calls: int = 5000) -> dict[str, Any]:
    """CPU per call of the model on the agent's own backend, in one thread of this process:
    process CPU (the runtime's pool threads included), the calling thread's, and wall.

    Calls take turns over copies of the input (~8 MB of them in all): each job the agent
    runs brings a tensor it has not read yet, and one input read over and over would sit in
    the CPU's cache and look cheaper than it is."""
    from edgeinfer.runtimes.backends import import_backend
    from edgeinfer.runtimes.base import LoadOptions

    size = sum(a.nbytes for a in feed.values())
    feeds = [{k: a.copy() for k, a in feed.items()}
             for _ in range(max(1, min(64, (8 << 20) // max(size, 1))))]
    session = import_backend(runtime).load(path, device, LoadOptions(precision=precision or "f32"))
    try:
        for f in feeds[:5]:
            session.infer(f)
        t0 = time.perf_counter()
        session.infer(feed)
        one = max(time.perf_counter() - t0, 1e-6)
        calls = int(min(max_calls, max(20, budget_s / one)))
        turns = [feeds[i % len(feeds)] for i in range(calls)]
        out: dict[str, Any] = {}

        def timed() -> None:
            p0, c0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
            for f in turns:
                session.infer(f)
            p1, c1, w1 = time.process_time(), time.thread_time(), time.perf_counter()
            out.update(calls=calls, cpu_ms_per_call=round((p1 - p0) * 1000 / calls, 4),
                       caller_thread_cpu_ms_per_call=round((c1 - c0) * 1000 / calls, 4),
                       wall_ms_per_call=round((w1 - w0) * 1000 / calls, 4))

        worker = threading.Thread(target=timed, name="runtime-cpu")
        worker.start()
        worker.join()
    finally:
        session.close()
    out.update(runtime=runtime, device=device, precision=precision, input_copies=len(feeds),
               how="time.process_time over N calls in one thread, nothing else running here")
    return out


def _level_timing(timing: points.Timing) -> points.Timing:
    # CPU time is read in clock ticks (10 ms): a window of at least 1.5 s keeps that under
    # ~1% of the figures at the rates seen here.
    measure = max(timing.measure_s, 1.5)
    return points.Timing(timing.warmup_s, measure, max(timing.max_s, timing.warmup_s + measure + 3),
                      timing.online_runs)


def _brief(p: dict[str, Any]) -> dict[str, Any]:
    return {k: p.get(k) for k in ("throughput", "p50_ms", "target_cpu_ms_per_job",
                                  "broker_cpu_ms_per_job", "client_cpu_ms_per_job")}


def _say_point(say: Say, job: str, who: str, p: dict[str, Any]) -> None:
    say(f"cpu {job:6s} {who:10s} c={p['concurrency']} {p['throughput']:8.1f} jobs/s  "
        f"CPU {p.get('target_cpu_ms_per_job')} ms/job (broker {p.get('broker_cpu_ms_per_job')}, "
        f"client {p.get('client_cpu_ms_per_job')})"
        + (f"  errors {p['errors']} ({p.get('error_sample')})" if p["errors"] else ""))


def run(work: Path, timing: points.Timing, say: Say, *, level: int = LEVEL,
        runtime_budget_s: float = 1.0, res: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part; fills `res` as it goes (what was measured survives a failure)."""
    res = res if res is not None else {}
    timing = _level_timing(timing)
    res.update(level=level, qos=1, payload="binary OIP", responders=list(RESPONDERS), jobs={})
    work.mkdir(parents=True, exist_ok=True)
    todo = jobs(work / "models")
    with subprocs.processes(work) as started:
        broker = Broker(work / "broker")
        broker.start()
        started.append(broker)
        url = broker.url
        broker_ps = psutil.Process(broker.proc.pid) if broker.proc else None
        conn = connect(url)
        started.append(conn)

        agent = agent_steps.new_agent(work / "agent", url, DEVICE)
        started.append(agent)
        agent_steps.start_until_online(conn, agent)
        assert agent.proc is not None
        agent_ps = psutil.Process(agent.proc.pid)
        store = ArtifactStore(work / "artifacts")
        client = InferenceClient(url, client_id="bench-cpu-client")
        started.append(client)
        names = profile.thread_names(agent_ps.pid)
        watched = subprocs.Watched(agent_ps, broker_ps)
        canned: dict[str, tuple[bytes, int | None]] = {}
        templates: dict[str, loadgen.Template] = {}
        for job in todo:
            m = job.model
            assert m.feed is not None and m.path is not None
            d = agent_steps.deploy_timed(conn, store, m, DEVICE)
            entry: dict[str, Any] = {"title": job.title, "model": m.name,
                                     "deploy": {k: d.get(k) for k in ("ok", "seconds", "runtime",
                                                                      "device", "precision",
                                                                      "message")},
                                     "points": {}}
            res["jobs"][job.key] = entry
            if not d["ok"]:
                raise RuntimeError(f"{m.name} not serving: {d['message']}")
            say(f"cpu: {m.name} serving on {d['runtime']}/{d['device']}")
            template = loadgen.oip_template(Topics(agent_steps.PREFIX, DEVICE).jobs, m.name, m.feed(1),
                                            binary=True)
            templates[job.key] = template
            canned[job.key] = agent_steps.capture_answer(conn, DEVICE, template)
            entry["request_bytes"] = template.size
            entry["answer_bytes"] = len(canned[job.key][0])
            # Per-thread figures need py-spy's thread names; without them, none.
            p = points.run_point(client, template, level, timing, watched,
                              thread_names=names or None)
            entry["points"]["agent"] = p
            _say_point(say, job.key, "agent", p)
        agent.stop()

        # The runtime's own CPU per call, with the agent gone and nothing else running here.
        for job in todo:
            entry = res["jobs"][job.key]
            dep = entry["deploy"]
            assert job.model.feed is not None and job.model.path is not None
            try:
                entry["runtime_cpu"] = runtime_cpu(job.model.path, dep["runtime"], dep["device"],
                                                   dep.get("precision"), job.model.feed(1),
                                                   runtime_budget_s)
            except Exception as exc:  # a runtime that loads in the agent but not here
                entry["runtime_cpu"] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"cpu {job.key:6s} runtime alone: {entry['runtime_cpu']}")

        # The bare responders, on the same broker, with the same client and jobs.
        for who, module, ready in (("paho_echo", "bench.echo", ECHO_READY),
                                   ("codec_echo", "bench.codec_echo", CODEC_ECHO_READY)):
            folder = work / f"canned-{who}"
            folder.mkdir()
            for key, (body, hlen) in canned.items():
                (folder / f"{who}-{key}.body").write_bytes(body)
                if hlen is not None:
                    (folder / f"{who}-{key}.hlen").write_text(str(hlen))
            proc = subprocs.start_helper([module, url, str(folder)], ready, work / f"{who}.log")
            started.append(proc)
            w = subprocs.Watched(psutil.Process(proc.pid), broker_ps)
            for job in todo:
                base = templates[job.key]
                template = loadgen.Template(Topics(agent_steps.PREFIX, f"{who}-{job.key}").jobs,
                                            base.head, base.tail, base.user_properties)
                p = points.run_point(client, template, level, timing, w)
                res["jobs"][job.key]["points"][who] = p
                _say_point(say, job.key, who, p)
            subprocs.stop_process(proc)
    res["summary"] = summary(res)
    return res


def _cpu(entry: dict[str, Any], who: str) -> float | None:
    p = entry.get("points", {}).get(who) or {}
    v = p.get("target_cpu_ms_per_job")
    return float(v) if v is not None and not p.get("errors") else None


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Per job: each responder's CPU ms/job, the agent's over each echo's, and the agent's
    beyond the runtime's own CPU per call."""
    out: dict[str, Any] = {}
    for key, entry in res.get("jobs", {}).items():
        agent, paho, codec = (_cpu(entry, w) for w in RESPONDERS)
        rt = (entry.get("runtime_cpu") or {}).get("cpu_ms_per_call")
        beyond = round(agent - rt, 3) if agent is not None and rt is not None else None
        out[key] = {"agent_cpu_ms": agent, "paho_echo_cpu_ms": paho, "codec_echo_cpu_ms": codec,
                    "agent_vs_paho_echo": _div(agent, paho), "agent_vs_codec_echo": _div(agent, codec),
                    "runtime_cpu_ms": rt, "agent_beyond_runtime_ms": beyond,
                    "agent_beyond_runtime_vs_paho_echo": _div(beyond, paho)}
    return out
