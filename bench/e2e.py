"""End to end: a real mosquitto, a real edge-agent process, models deployed through the
fleet's deploy API, jobs from the job client SDK; and, on the same broker with the same
client, the transport echo (`bench.echo`) and the naive baseline (`bench.naive`).

Everything runs under one temporary folder and is stopped at the end. The agent runs with
its defaults (2 job workers, runtime threads left to the runtime, queue of 256 jobs) except
INFO logging; it picks each model's runtime itself (default preference), and the results
say which it picked.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench import loadgen, naive, profile
from bench.echo import READY as ECHO_READY
from bench.naive import READY as NAIVE_READY
from bench.raw import busy_cpu_s
from bench.refmodels import RefModel
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.deploy import (
    ReportWatcher,
    artifact_uri,
    model_spec,
    next_manifest,
    publish_desired,
    read_current,
    store_artifact,
)
from edgeinfer.fleet.localbroker import Broker
from edgeinfer.fleet.mqtt import Connection, connect
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY
from tests.agentproc import AgentProcess

PREFIX = "edge/v1"
DEVICE = "bench-gw"
NAIVE_DEVICE = "naive-gw"
LEVELS = (1, 8, 32, 128)
CORES = psutil.cpu_count() or 1
MODES = ("binary", "json")

Say = Callable[[str], None]


@dataclass(frozen=True)
class Timing:
    warmup_s: float
    measure_s: float
    max_s: float  # per point, warm-up included
    online_runs: int


# --- processes and their resources ----------------------------------------------------------


class Sampler:
    """RSS of the agent every 50 ms, tagged with what was running."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self._tag = "idle"
        self._lock = threading.Lock()
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def tag(self, tag: str) -> None:
        with self._lock:
            self._tag = tag

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                rss = self._proc.memory_info().rss
            except psutil.Error:
                return
            with self._lock:
                self.peaks[self._tag] = max(self.peaks.get(self._tag, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


@dataclass
class Watched:
    """Processes whose CPU time a point reports: the target, the broker, this client; and
    the machine's busy time, so CPU that none of them used (other work on the machine)
    shows up."""

    target: psutil.Process | None
    broker: psutil.Process | None
    client: psutil.Process = field(default_factory=psutil.Process)

    def snapshot(self) -> tuple[float, float, float, float]:
        return _cpu_s(self.target), _cpu_s(self.broker), _cpu_s(self.client), busy_cpu_s()


def start_helper(args: list[str], ready: str, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                                stderr=logf, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if ready not in line:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}; log: {log.read_text()[-2000:]}")
    return proc


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- the agent ----------------------------------------------------------------------------


def new_agent(work: Path, url: str, device: str) -> AgentProcess:
    return AgentProcess(work, url, device_id=device, log={"level": "INFO"},
                        telemetry={"interval_s": 30.0})


def start_until_online(conn: Connection, agent: AgentProcess, timeout: float = 60.0) -> float:
    """Start `agent`; seconds from process start to its retained `online` arriving."""
    online = threading.Event()
    topic = Topics(PREFIX, agent.device_id).state

    def on_state(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            if json.loads(msg.payload).get("state") == "online":
                online.set()

    conn.subscribe(topic, on_state)
    try:
        t0 = time.perf_counter()
        agent.start()
        if not online.wait(timeout):
            raise RuntimeError(f"agent {agent.device_id} not online after {timeout:g}s:\n"
                               f"{agent.log_text()[-3000:]}")
        return time.perf_counter() - t0
    finally:
        conn.unsubscribe(topic)


def deploy_timed(conn: Connection, store: ArtifactStore, model: RefModel, device: str,
                 timeout: float = 120.0) -> dict[str, Any]:
    """Deploy one model (the fleet's deploy steps) and time publish -> reported serving."""
    assert model.path is not None
    topics = Topics(PREFIX, device)
    artifact = store_artifact(model.path, store)
    spec = model_spec(name=model.name, version="1", artifact=artifact,
                      uri=artifact_uri(artifact, None), health=model.health,
                      max_batch=(model.batching or {}).get("max_batch"),
                      max_delay_ms=(model.batching or {}).get("max_delay_ms"))
    current, applied = read_current(conn, topics)
    manifest = next_manifest(current, upsert=spec, applied=applied)
    watcher = ReportWatcher(conn, topics)
    try:
        t0 = time.perf_counter()
        publish_desired(conn, topics, manifest)
        result = watcher.wait_serving(spec.name, spec.version, spec.sha256, manifest.revision,
                                      timeout)
        seconds = time.perf_counter() - t0
    finally:
        watcher.close()
    entry = result.entry or {}
    return {
        "ok": result.ok, "seconds": round(seconds, 3), "message": result.message,
        "size_bytes": artifact.size, "runtime": entry.get("runtime"), "device": entry.get("device"),
        "precision": entry.get("precision"), "attempts": entry.get("attempts", []),
        "candidates": entry.get("candidates", []), "autotune": entry.get("autotune"),
        "batching": model.batching,
    }


def capture_answer(conn: Connection, device: str, template: loadgen.Template
                   ) -> tuple[bytes, int | None]:
    """The exact bytes the agent answers one job with (for the echo to send back)."""
    reply = f"{PREFIX}/reply/bench-capture/res"
    got: list[tuple[bytes, int | None]] = []
    arrived = threading.Event()

    def on_answer(msg: Any) -> None:
        hlen = None
        for key, value in getattr(msg.properties, "UserProperty", None) or []:
            if key == HEADER_LENGTH_PROPERTY:
                hlen = int(value)
        got.append((bytes(msg.payload), hlen))
        arrived.set()

    conn.subscribe(reply, on_answer)
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply
        props.CorrelationData = b"capture"
        if template.user_properties:
            props.UserProperty = list(template.user_properties)
        conn.publish(Topics(PREFIX, device).jobs, template.payload(), qos=1,
                     properties=props).result(10)
        if not arrived.wait(30):
            raise RuntimeError(f"no answer from {device} to capture")
        return got[0]
    finally:
        conn.unsubscribe(reply)


# --- points -------------------------------------------------------------------------------


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


def _reporter(say: Say, what: str, mode: str) -> Callable[[dict[str, Any]], None]:
    return lambda p: say(_line(what, mode, p))


def _line(what: str, mode: str, p: dict[str, Any]) -> str:
    if p.get("skipped"):
        return f"{what:26s} {mode:6s} c={p['concurrency']:<3d} {p['skipped']}"
    lat = f"p50 {p['p50_ms']:8.2f} ms p99 {p['p99_ms']:8.2f} ms" if p["p50_ms"] is not None else "no answers"
    err = f"  errors {p['errors']} ({p.get('error_sample')})" if p["errors"] else ""
    return (f"{what:26s} {mode:6s} c={p['concurrency']:<3d} {p['throughput']:9.1f} jobs/s  "
            f"{lat}{err}")


def _profiled_point(client: InferenceClient, template: loadgen.Template, level: int,
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


# --- the whole end-to-end part --------------------------------------------------------------


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


@contextlib.contextmanager
def processes(work: Path) -> Iterator[list[Any]]:
    """Whatever is appended is stopped or closed, in reverse order."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for item in reversed(started):
            with contextlib.suppress(Exception):
                if isinstance(item, subprocess.Popen):
                    stop_process(item)
                elif hasattr(item, "stop"):
                    item.stop()
                else:
                    item.close()


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
                                    _reporter(say, f"agent {model.name}", mode))
                entry["modes"][mode] = {"request_bytes": template.size, "points": points}
                for level in (lv for m, md, lv in profile_at if (m, md) == (model.name, mode)):
                    if profile_dir is None:
                        break
                    tag = f"{model.name}-{mode}-c{level}"
                    sampler.tag(f"profiling {tag}")
                    prof = _profiled_point(client, template, level, timing, watched_agent,
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
                                        _reporter(say, f"echo ({model.name} bytes)", mode))
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
            say(_line(f"naive ({chosen.name})", "b64", p))
            res.naive = {"model": chosen.name, "runtime": "onnxruntime CPU in on_message",
                         "payload": "JSON, base64 tensors", "points": [p]}
            stop_process(proc)
    return res
