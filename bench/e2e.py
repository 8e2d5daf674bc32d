"""End to end: a real mosquitto, a real edge-agent process, models deployed through the
fleet's deploy API, jobs from the job client SDK; and, on the same broker with the same
client, the transport echo (`bench.echo`) and the naive baseline (`bench.naive`).

Everything runs under one temporary folder and is stopped at the end. The agent runs with
its defaults (2 job workers, runtime threads left to the runtime, queue of 256 jobs) except
INFO logging; it picks each model's runtime itself (default preference), and the results
say which it picked.

Here: the part's order of work and its results. The processes it starts are handled by
`bench.subprocs`, the agent's start and deploys by `bench.agent_steps`, each measured point
by `bench.points`.
"""


from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import loadgen, naive, profile
from bench.agent_steps import PREFIX, capture_answer, deploy_timed, new_agent, start_until_online
from bench.echo import READY as ECHO_READY
from bench.naive import READY as NAIVE_READY
from bench.points import Say, Timing, point_line, point_reporter, profiled_point, run_levels, run_point
from bench.refmodels import RefModel
from bench.subprocs import Sampler, Watched, processes, start_helper, stop_process
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.localbroker import Broker
from edgeinfer.fleet.mqtt import connect

DEVICE = "bench-gw"
NAIVE_DEVICE = "naive-gw"
LEVELS = (1, 8, 32, 128)
MODES = ("binary", "json")


@dataclass
class E2EResult:
    broker: dict[str, Any] = field(default_factory=dict)
    startup: dict[str, Any] = field(default_factory=dict)
    deploys: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    transport: dict[str, Any] = field(default_factory=dict)
    naive: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rss_mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def run(work: Path, models: list[RefModel], timing: Timing, say: Say, *,
        levels: tuple[int, ...] = LEVELS, echo_models: tuple[str, ...] = ("digits", "mobilenet"),
        naive_model: str = "mobilenet", naive_level: int = 32,
        profile_dir: Path | None = None,
        profile_at: tuple[tuple[str, str, int], ...] = (("digits", "binary", 32),
                                                         ("mobilenet", "binary", 32)),
        res: E2EResult | None = None) -> E2EResult:
    """The end-to-end part, filling `res` as it goes (what was measured survives a failure).

    With `profile_dir`, each (model, mode, level) of `profile_at` runs once more under
    py-spy after its measured points (never during them: sampling costs CPU), and the
    stacks and a summary land in `profile_dir`."""
    res = res if res is not None else E2EResult()
    with processes(work) as started:
        broker = Broker(work / "broker")
        broker.start()
        started.append(broker)
        url = broker.url
        res.broker = {"url": url, "mosquitto": broker.exe,
                      "config": broker.conf.read_text().splitlines()}
        conn = connect(url)
        started.append(conn)
        broker_ps = psutil.Process(broker.proc.pid) if broker.proc else None

        # -- start to online, no models ---------------------------------------------------
        times, rss = [], []
        for i in range(timing.online_runs):
            agent = new_agent(work / f"cold-{i}", url, f"bench-cold-{i}")
            seconds = start_until_online(conn, agent)
            times.append(seconds)
            assert agent.proc is not None
            time.sleep(0.5)
            rss.append(psutil.Process(agent.proc.pid).memory_info().rss)
            agent.stop()
            say(f"start to online (no models): {seconds:.3f} s, RSS {rss[-1] / 2**20:.0f} MB")
        res.startup = {"runs_s": [round(t, 3) for t in times],
                       "median_s": round(float(np.median(times)), 3),
                       "rss_no_models_mb": _rss_mb(int(np.median(rss)))}

        # -- the agent under test ---------------------------------------------------------
        agent = new_agent(work / "agent", url, DEVICE)
        started.append(agent)
        seconds = start_until_online(conn, agent)
        assert agent.proc is not None
        agent_ps = psutil.Process(agent.proc.pid)
        sampler = Sampler(agent.proc.pid)
        started.append(sampler)
        res.agent = {"device": DEVICE, "start_to_online_s": round(seconds, 3),
                     "config": (work / "agent" / "agent.yaml").read_text(), "models": {}}
        store = ArtifactStore(work / "artifacts")

        e2e_models = [m for m in models if m.e2e and m.path is not None]
        # The small model first: idle memory is measured with it alone.
        e2e_models.sort(key=lambda m: m.name != "digits")
        for model in e2e_models:
            sampler.tag(f"deploy {model.name}")
            d = deploy_timed(conn, store, model, DEVICE)
            res.deploys[model.name] = d
            say(f"deploy {model.name}: {'serving' if d['ok'] else 'FAILED'} on "
                f"{d['runtime']}/{d['device']} {d.get('precision') or ''} {d['seconds']:.2f} s "
                "after the manifest")
            if model.name == "digits" and d["ok"]:
                sampler.tag("idle, digits loaded")
                time.sleep(1.5)
                res.memory["idle_one_small_model_mb"] = _rss_mb(agent_ps.memory_info().rss)
                res.memory["idle_one_small_model_uss_mb"] = _rss_mb(
                    agent_ps.memory_full_info().uss)
                say(f"agent RSS idle with digits loaded: {res.memory['idle_one_small_model_mb']} MB")
        sampler.tag("idle, all loaded")
        time.sleep(1.0)
        res.memory["idle_all_models_mb"] = _rss_mb(agent_ps.memory_info().rss)

        client = InferenceClient(url, client_id="bench-client")
        started.append(client)
        watched_agent = Watched(agent_ps, broker_ps)
        names = profile.thread_names(agent_ps.pid)
        jobs_topic = Topics(PREFIX, DEVICE).jobs
        canned: dict[str, tuple[bytes, int | None]] = {}
        for model in e2e_models:
            d = res.deploys[model.name]
            entry: dict[str, Any] = {"runtime": d["runtime"], "device": d["device"],
                                     "precision": d.get("precision"), "modes": {}}
            res.agent["models"][model.name] = entry
            if not d["ok"]:
                entry["error"] = d["message"]
                continue
            assert model.feed is not None
            one = client.infer(model.name, model.feed(1), device=DEVICE, binary=True, timeout=60)
            entry["one_job"] = {k: one.parameters.get(k) for k in ("runtime", "device", "infer_ms",
                                                                   "queue_ms")}
            for mode in model.modes:
                template = loadgen.oip_template(jobs_topic, model.name, model.feed(1),
                                                binary=mode == "binary")
                if model.name in echo_models:
                    canned[f"{model.name}-{mode}"] = capture_answer(conn, DEVICE, template)
                def agent_point(level: int, model: RefModel = model, mode: str = mode,
                                template: loadgen.Template = template) -> dict[str, Any]:
                    tag = f"{model.name} {mode} c={level}"
                    sampler.tag(tag)
                    p = run_point(client, template, level, timing, watched_agent,
                                  thread_names=names)
                    p["rss_peak_mb"] = _rss_mb(sampler.peaks.get(tag))
                    return p

                points = run_levels(levels, timing, agent_point,
                                    point_reporter(say, f"agent {model.name}", mode))
                entry["modes"][mode] = {"request_bytes": template.size, "points": points}
                for level in (lv for m, md, lv in profile_at if (m, md) == (model.name, mode)):
                    if profile_dir is None:
                        break
                    tag = f"{model.name}-{mode}-c{level}"
                    sampler.tag(f"profiling {tag}")
                    prof = profiled_point(client, template, level, timing, watched_agent,
                                           names, profile_dir, tag)
                    res.profile[tag] = prof
                    say(f"profiled {tag} under py-spy: {prof.get('raw_stacks') or prof.get('error')}")
        sampler.tag("after load")
        res.memory["peak_under_load_mb"] = _rss_mb(max(sampler.peaks.values(), default=None))
        res.memory["peaks_mb"] = {k: _rss_mb(v) for k, v in sampler.peaks.items()}
        cnn_peaks = [v for k, v in sampler.peaks.items() if k.startswith("mobilenet ")]
        res.memory["peak_mobilenet_load_mb"] = _rss_mb(max(cnn_peaks, default=None))
        agent.stop()
        sampler.stop()

        # -- the transport alone ----------------------------------------------------------
        if canned:
            folder = work / "canned"
            folder.mkdir()
            for name, (body, hlen) in canned.items():
                (folder / f"echo-{name}.body").write_bytes(body)
                if hlen is not None:
                    (folder / f"echo-{name}.hlen").write_text(str(hlen))
            echo = start_helper(["bench.echo", url, str(folder)], ECHO_READY, work / "echo.log")
            started.append(echo)
            watched_echo = Watched(psutil.Process(echo.pid), broker_ps)
            for model in e2e_models:
                if model.name not in echo_models or model.feed is None:
                    continue
                modes: dict[str, Any] = {}
                res.transport[model.name] = {"modes": modes}
                for mode in MODES:
                    if f"{model.name}-{mode}" not in canned:
                        continue
                    topic = Topics(PREFIX, f"echo-{model.name}-{mode}").jobs
                    template = loadgen.oip_template(topic, model.name, model.feed(1),
                                                    binary=mode == "binary")
                    def echo_point(level: int, template: loadgen.Template = template
                                   ) -> dict[str, Any]:
                        return run_point(client, template, level, timing, watched_echo)

                    points = run_levels(levels, timing, echo_point,
                                        point_reporter(say, f"echo ({model.name} bytes)", mode))
                    modes[mode] = {"request_bytes": template.size,
                                   "answer_bytes": len(canned[f"{model.name}-{mode}"][0]),
                                   "points": points}
            stop_process(echo)

        # -- the naive baseline -----------------------------------------------------------
        chosen = next((m for m in e2e_models if m.name == naive_model), None)
        if chosen is not None and chosen.path is not None and chosen.feed is not None:
            proc = start_helper(["bench.naive", url, str(chosen.path), "--device", NAIVE_DEVICE],
                                NAIVE_READY, work / "naive.log")
            started.append(proc)
            body = naive.request_body("bench-" + "0" * 12, chosen.feed(1))
            template = loadgen.split_template(Topics(PREFIX, NAIVE_DEVICE).jobs, body,
                                              "bench-" + "0" * 12)
            p = run_point(client, template, naive_level, timing,
                          Watched(psutil.Process(proc.pid), broker_ps))
            say(point_line(f"naive ({chosen.name})", "b64", p))
            res.naive = {"model": chosen.name, "runtime": "onnxruntime CPU in on_message",
                         "payload": "JSON, base64 tensors", "points": [p]}
            stop_process(proc)
    return res
