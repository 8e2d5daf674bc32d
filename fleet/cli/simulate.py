"""`edge-fleet simulate`: run N simulated agents (fleet/simulator/) in this process until
--duration ends, SIGINT or SIGTERM, printing their counters every --report-every.

    edge-fleet simulate --devices 1000 --report-every 10s [--duration 600] [--id-prefix sim-]
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from types import FrameType
from typing import Any

from edgeinfer.cliargs import Parser, UsageError, duration, parse_duration
from edgeinfer.fleet.cli.common import topic_prefix
from edgeinfer.fleet.simulator import SimConfig, Simulator
from edgeinfer.fleet.tls_options import security_from_args


def add_simulate_parser(sub: Any, common: Parser) -> None:
    p = sub.add_parser(
        "simulate", parents=[common], help="run many simulated devices (load and rollout tests)",
        description="Run N simulated agents in this process, each its own MQTT client: "
                    "state (birth and will), retained reported, periodic telemetry, and "
                    "desired manifests applied after a short simulated install. No model is "
                    "downloaded or run.",
    )
    p.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices")
    p.add_argument("--id-prefix", default="sim-", metavar="TEXT",
                   help="device ids are TEXT0000, TEXT0001, ... (default: sim-)")
    p.add_argument("--report-every", type=duration, default="10s", metavar="DURATION",
                   help="telemetry period per device (default: 10s)")
    p.add_argument("--duration", type=duration, default=None, metavar="DURATION",
                   help="stop after this long (default: until Ctrl-C or SIGTERM)")
    p.add_argument("--install-delay", default="0.5s-1.5s", metavar="MIN[-MAX]",
                   help="how long a simulated install takes (default: 0.5s-1.5s)")
    p.add_argument("--fail", action="append", default=[], metavar="NAME[:VERSION]",
                   help="installs of this model (or version) fail (repeatable)")
    p.add_argument("--jobs-per-s", type=float, default=1.0, metavar="R",
                   help="simulated jobs per second per serving model, as telemetry counts "
                        "them (default: 1)")
    p.add_argument("--error-rate", type=float, default=0.0, metavar="F",
                   help="share of those jobs that fail, 0..1 (default: 0)")
    p.add_argument("--connect-rate", type=float, default=500.0, metavar="R",
                   help="new connections per second per thread (default: 500)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="network threads the devices are spread over (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (repeatable runs)")
    p.set_defaults(func=cmd_simulate)


def _delay_range(text: str) -> tuple[float, float]:
    lo_text, _, hi_text = text.partition("-")
    lo = parse_duration(lo_text, "--install-delay")
    hi = parse_duration(hi_text, "--install-delay") if hi_text else lo
    if hi < lo:
        lo, hi = hi, lo
    return lo, hi


def cmd_simulate(args: argparse.Namespace) -> int:
    report_s, stop_after_s = args.report_every, args.duration
    if report_s <= 0:
        raise UsageError("--report-every must be positive")
    try:
        delays = _delay_range(args.install_delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 0 <= args.error_rate <= 1:
        raise UsageError("--error-rate must lie between 0 and 1")
    cfg = SimConfig(devices=args.devices, broker_url=args.broker, prefix=topic_prefix(args),
                    id_prefix=args.id_prefix, report_every_s=report_s, install_delay_s=delays,
                    fail=frozenset(args.fail), jobs_per_s=args.jobs_per_s,
                    error_rate=args.error_rate, connect_rate=args.connect_rate,
                    threads=args.threads, seed=args.seed, security=security_from_args(args))
    try:
        sim = Simulator(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    ids = sim.device_ids
    print(f"simulating {cfg.devices} devices ({ids[0]} .. {ids[-1]}) on {sim.address}, "
          f"telemetry every {report_s:g}s (Ctrl-C to stop)", flush=True)
    started = time.monotonic()
    sim.start()
    try:
        while not stop.is_set():
            left = None if stop_after_s is None else stop_after_s - (time.monotonic() - started)
            if left is not None and left <= 0:
                break
            stop.wait(min(report_s, left) if left is not None else report_s)
            print(sim.stats.line(cfg.devices), flush=True)
    finally:
        sim.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
    print(f"stopped after {time.monotonic() - started:.1f}s: {sim.stats.line(cfg.devices)}")
    return 0
