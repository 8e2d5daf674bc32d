"""Fleet scale: one controller, one mosquitto, N simulated devices, one rollout to all.

    python -m bench.fleet_scale --devices 1000 [--report-every 10s] [--steady 60s] \\
        [--bake 5s] [--out docs/benchmarks/fleet_scale.md]

Starts a mosquitto (`fleet.localbroker.Broker`), the controller as a subprocess
(`edge-fleet serve`, so psutil measures it alone) and N simulated devices in this
process (`fleet.simulator`, telemetry every `--report-every`). Then:

1. registration: time until every device is online in the registry with its `reported`;
2. steady state (`--steady`): the controller's CPU and memory while it ingests the
   telemetry, and the telemetry lag: from a device's publish (`ts` in the telemetry) to
   (a) the controller receiving it (`received_at` of the row) and (b) the row being
   visible in the registry (this process polls the SQLite file every 50 ms, so (b) is
   late by up to that much; `received_at` has millisecond resolution);
3. a rollout of a pushed model to every device (`--waves`, default 1,10%,50%,100%,
   `--bake` each) recorded with `edge-fleet rollout start` and driven by the controller:
   the time to `completed`, per wave, and the controller's CPU and memory meanwhile.

Every device starts with a baseline desired manifest (a fleet in service has one; see
"--no-baseline" for the first deploy to blank devices). Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from edgeinfer.cliargs import parse_duration
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.cli import main as fleet_cli
from edgeinfer.fleet.deploy import artifact_uri, model_spec, next_manifest, publish_desired, store_artifact
from edgeinfer.fleet.localbroker import Broker, free_port, wait_port
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.registry import open_registry
from edgeinfer.fleet.rollout import COMPLETED, TERMINAL, RolloutStore
from edgeinfer.fleet.simulator import SimConfig, Simulator

PREFIX = "edge/v1"
CLIENT_ID = "edge-fleet-bench"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's open-file limit (mosquitto and the controller inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class CpuMeter:
    """CPU seconds and peak RSS of one process over a phase."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

    def cpu_s(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)


class Phase:
    def __init__(self, meters: dict[str, CpuMeter]) -> None:
        self.meters = meters
        self.t0 = time.monotonic()
        self.cpu0 = {k: m.cpu_s() for k, m in meters.items()}

    def result(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        out: dict[str, Any] = {"wall_s": wall}
        for k, m in self.meters.items():
            used = m.cpu_s() - self.cpu0[k]
            out[k] = {"cpu_s": used, "cpu_pct": 100 * used / wall if wall else 0.0,
                      "rss_mb": m.rss() / 2**20, "peak_rss_mb": m.peak_rss / 2**20}
        return out


class TelemetryLag:
    """Polls the registry's telemetry table; one sample per (device, ts) newly seen."""

    def __init__(self, db: Path, poll_s: float = 0.05) -> None:
        self.db = db
        self.poll_s = poll_s
        self.received: list[float] = []
        self.visible: list[float] = []
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TelemetryLag:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            self._poll(conn, record=False)  # what is there already is not a sample
        finally:
            conn.close()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self, conn: sqlite3.Connection, record: bool) -> None:
        rows = conn.execute(
            "SELECT device_id, received_at, json_extract(body, '$.ts') FROM telemetry").fetchall()
        now = time.time()
        for device, received_at, ts in rows:
            if not isinstance(ts, (int, float)) or self._seen.get(device) == ts:
                continue
            self._seen[device] = float(ts)
            if record:
                got = datetime.fromisoformat(str(received_at)).timestamp()
                self.received.append(got - float(ts))
                self.visible.append(now - float(ts))

    def _run(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            while not self._stop.wait(self.poll_s):
                with contextlib.suppress(sqlite3.OperationalError):
                    self._poll(conn, record=True)
        finally:
            conn.close()


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * 1000
    return {"n": float(len(a)), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


@contextlib.contextmanager
def controller(cfg_path: Path, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    exe = Path(sys.executable).with_name("edge-fleet")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeinfer.fleet.cli"]
    logf = log_path.open("ab")
    proc = subprocess.Popen([*cmd, "serve", "--config", str(cfg_path)], stdout=logf, stderr=logf)
    logf.close()
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def until(check: Any, timeout: float, what: str, poll: float = 0.2) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(poll)
    return time.monotonic() - start


def publish_baseline(url: str, ids: list[str], spec: Any) -> float:
    """Every device's first desired manifest (not part of the measured rollout)."""
    t0 = time.monotonic()
    with connect(url) as conn:
        for dev in ids:
            manifest = next_manifest(None, upsert=spec)
            publish_desired(conn, Topics(PREFIX, dev), manifest)
    return time.monotonic() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    limits = raise_nofile(max(4 * args.devices + 1024, 8192))
    say(f"open files limit {limits[0]} (hard {limits[1]})")
    work = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    results: dict[str, Any] = {
        "devices": args.devices, "report_every_s": args.report_every_s,
        "machine": {"cpus": psutil.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "python": platform.python_version()},
        "waves": args.waves, "bake_s": args.bake_s,
    }
    broker = Broker(work / "broker", extra_conf="max_connections -1\n")
    broker.start()
    say(f"mosquitto on {broker.url}")
    http_port = free_port()
    db = work / "fleet" / "registry.sqlite3"
    cfg_path = work / "fleet.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "broker": {"url": broker.url, "client_id": CLIENT_ID},
        "prefix": PREFIX, "state_dir": str(work / "fleet"),
        "artifact_dir": str(work / "artifacts"),
        "http": {"host": "127.0.0.1", "port": http_port},
    }))
    # Two "models": the rollout never runs them (the devices are simulated).
    files = {}
    for version in ("1", "2"):
        files[version] = work / f"bench-{version}.onnx"
        files[version].write_bytes(os.urandom(64 * 1024))
        assert fleet_cli(["models", "push", str(files[version]), "--name", "bench",
                          "--version", version, "--config", str(cfg_path)]) == 0
    store_dir = ArtifactStore(work / "artifacts")
    base = store_artifact(files["1"], store_dir)
    base_spec = model_spec(name="bench", version="1", artifact=base,
                           uri=artifact_uri(base, f"http://127.0.0.1:{http_port}"))
    sim = Simulator(SimConfig(
        devices=args.devices, broker_url=broker.url, prefix=PREFIX,
        report_every_s=args.report_every_s, install_delay_s=(0.5, 2.0), seed=7,
        threads=args.threads))
    ids = sim.device_ids
    registry = open_registry(db)
    try:
        with controller(cfg_path, work / "controller.log") as ctl:
            wait_port(http_port, 30)
            assert broker.proc is not None
            meters = {"controller": CpuMeter(ctl.pid), "mosquitto": CpuMeter(broker.proc.pid),
                      "simulator (this process)": CpuMeter(os.getpid())}
            say(f"controller pid {ctl.pid}; starting {args.devices} simulated devices")
            phase = Phase(meters)
            sim.start()
            if not sim.wait_connected(120):
                raise TimeoutError(f"devices did not connect: {sim.stats.line(args.devices)}")
            connected_s = time.monotonic() - phase.t0

            def registered() -> bool:
                return bool(sum(1 for d in registry.devices() if d.online and d.reported_at)
                            >= args.devices)
            until(registered, 300, "every device in the registry", 0.5)
            results["registration"] = {"connected_s": connected_s, **phase.result()}
            say(f"all {args.devices} connected in {connected_s:.1f}s, registered in "
                f"{results['registration']['wall_s']:.1f}s")
            if args.baseline:
                took = publish_baseline(broker.url, ids, base_spec)
                say(f"baseline manifests published in {took:.1f}s; waiting for installs")
                until(lambda: all(d.revision == 1 for d in registry.devices()), 300,
                      "baseline serving", 0.5)
                results["baseline_publish_s"] = took
            # Let the burst settle, then measure steady state.
            time.sleep(min(args.report_every_s, 5.0))
            say(f"steady state for {args.steady_s:g}s")
            with TelemetryLag(db) as lag:
                phase = Phase(meters)
                time.sleep(args.steady_s)
                results["steady"] = phase.result()
            results["telemetry_lag_ms"] = {"received": pct(lag.received),
                                           "visible": pct(lag.visible)}
            say(f"steady: {json.dumps(results['steady'], default=float)}")
            say(f"lag: {json.dumps(results['telemetry_lag_ms'])}")

            store = RolloutStore(registry)
            phase = Phase(meters)
            t0 = time.monotonic()
            assert fleet_cli(["rollout", "start", "bench:2", "--group", "",
                              "--waves", args.waves, "--bake", f"{args.bake_s:g}s",
                              "--install-timeout", "300s",
                              "--artifact-base-url", f"http://127.0.0.1:{http_port}",
                              "--config", str(cfg_path)]) == 0
            rid = store.all()[-1].id
            waves: list[dict[str, Any]] = []
            last = (-1, "")
            while True:
                r = store.get(rid)
                assert r is not None
                if (r.wave, r.phase) != last:
                    last = (r.wave, r.phase)
                    waves.append({"wave": r.wave + 1, "phase": r.phase,
                                  "at_s": time.monotonic() - t0})
                    say(f"rollout wave {r.wave + 1} {r.phase} at {time.monotonic() - t0:.1f}s")
                if r.status in TERMINAL:
                    break
                if time.monotonic() - t0 > args.timeout_s:
                    raise TimeoutError(f"rollout still {r.status} after {args.timeout_s}s")
                time.sleep(0.1)
            took = time.monotonic() - t0
            results["rollout"] = {"status": r.status, "reason": r.reason, "total_s": took,
                                  "waves": waves, **phase.result()}
            devices = store.devices(rid)
            results["rollout"]["serving"] = sum(1 for d in devices if d.state == "serving")
            say(f"rollout {r.status} in {took:.1f}s "
                f"({results['rollout']['serving']} devices serving bench:2)")
            for m in meters.values():
                m.close()
        results["sim_stats"] = dataclasses.asdict(sim.stats)
    finally:
        sim.stop()
        registry.close()
        broker.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")
    assert results["rollout"]["status"] == COMPLETED, results["rollout"]
    return results


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    reg, steady, ro = res["registration"], res["steady"], res["rollout"]
    lag = res["telemetry_lag_ms"]

    def row(name: str, ph: dict[str, Any]) -> str:
        c = ph["controller"]
        return (f"| {name} | {ph['wall_s']:.1f} s | {c['cpu_pct']:.1f}% | {c['rss_mb']:.0f} MB "
                f"(peak so far {c['peak_rss_mb']:.0f}) | {ph['mosquitto']['cpu_pct']:.1f}% | "
                f"{ph['simulator (this process)']['cpu_pct']:.1f}% |")

    def lag_row(name: str, d: dict[str, float]) -> str:
        return (f"| {name} | {int(d['n'])} | {d['p50']:.1f} | {d['p95']:.1f} | {d['p99']:.1f} | "
                f"{d['max']:.1f} |")

    waves = ", ".join(f"wave {w['wave']} {w['phase']} at {w['at_s']:.1f} s" for w in ro["waves"])
    return "\n".join([
        f"- devices: {res['devices']}, telemetry every {res['report_every_s']:g} s each "
        f"({res['devices'] / res['report_every_s']:.0f} messages/s)",
        f"- machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GB, Python {m['python']}; "
        "broker, controller and simulator share it",
        f"- all devices connected in {reg['connected_s']:.1f} s and in the registry "
        f"(online, with `reported`) in {reg['wall_s']:.1f} s",
        f"- rollout `{res['waves']}`, bake {res['bake_s']:g} s: **{ro['status']} in "
        f"{ro['total_s']:.1f} s**, {ro['serving']} devices serving ({waves})",
        "",
        "| phase | wall | controller CPU (of one core) | controller RSS | mosquitto CPU | "
        "simulator CPU |",
        "| --- | --- | --- | --- | --- | --- |",
        row("connect + register", reg),
        row("steady telemetry", steady),
        row("rollout", ro),
        "",
        "Telemetry lag (ms), from the device's publish (`ts`) to:",
        "",
        "| to | samples | p50 | p95 | p99 | max |",
        "| --- | --- | --- | --- | --- | --- |",
        lag_row("controller received it (`received_at`)", lag["received"]),
        lag_row("row visible in the registry (polled every 50 ms)", lag["visible"]),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--report-every", default="10s")
    p.add_argument("--steady", default="60s", help="steady-state window (default: 60s)")
    p.add_argument("--waves", default="1,10%,50%,100%")
    p.add_argument("--bake", default="5s")
    p.add_argument("--threads", type=int, default=1, help="simulator network threads")
    p.add_argument("--timeout", default="15m", help="give the rollout up after this long")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="roll out to devices that have no desired manifest yet")
    p.add_argument("--out", type=Path, help="append the results (markdown) to this file")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    args.report_every_s = parse_duration(args.report_every)
    args.steady_s = parse_duration(args.steady)
    args.bake_s = parse_duration(args.bake)
    args.timeout_s = parse_duration(args.timeout)
    res = run(args)
    text = markdown(res)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=float))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M')}: {res['devices']} devices"
                    f"{'' if args.baseline else ', no baseline manifest'}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
