"""`edge-agent run | doctor | version`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from edgeinfer.agent.config import (
    DEFAULT_CONFIG_PATH,
    AgentConfig,
    BrokerConfig,
    ConfigError,
    deprecations,
    load_config,
)
from edgeinfer.agent.extras import missing_for_agent
from edgeinfer.agent.preflight import environment_problems
from edgeinfer.cliargs import Parser, version_line
from edgeinfer.contract.brokerurl import parse_broker_url

# A bad config found by --validate-config or doctor (README: "exit 2 naming the key").
EXIT_CONFIG = 2
# The daemon (`run`) stops on a config or permission error with EX_CONFIG instead: the unit
# says RestartPreventExitStatus=78, since no restart mends it.
EXIT_RUN_CONFIG = os.EX_CONFIG

log = logging.getLogger(__name__)

PROG = "edge-agent"


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    env = os.environ.get("EDGE_AGENT_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _load(arg: str | None) -> AgentConfig:
    return load_config(_config_path(arg))


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    where = str(_config_path(args.config) or "(defaults)")
    problems = environment_problems(cfg)
    if args.validate_config:
        for problem in problems:
            print(f"edge-agent: config error: {where}: {problem}", file=sys.stderr)
        if problems:
            return EXIT_CONFIG
        print(f"config OK: device {cfg.device_id}, broker {cfg.broker.url}, state {cfg.state_dir}")
        return 0
    lasting = [p for p in problems if p.lasting]
    if lasting:
        raise ConfigError(f"{where}: {lasting[0]}")
    missing = missing_for_agent()
    if missing is not None:
        # Not a fault a restart mends: EX_CONFIG, which the unit does not restart on.
        print(f"edge-agent: {missing}", file=sys.stderr)
        return os.EX_CONFIG
    logging.basicConfig(
        level=cfg.log.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for line in deprecations(_config_path(args.config)):
        log.warning("%s", line)
    for problem in problems:  # none lasting: e.g. DNS not up yet at boot
        log.warning("%s: %s; starting anyway, the broker is tried again", where, problem)
    from edgeinfer.agent.daemon import Agent  # heavy imports (runtimes) only when running
    from edgeinfer.agent.lifecycle import run_service

    try:
        agent = Agent(cfg)  # creates state_dir, the store and the journal
    except OSError as exc:
        # The same for systemd as a bad config: restarting does not mend permissions.
        what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        raise ConfigError(f"{where}: key 'state_dir': cannot set up {cfg.state_dir} ({what})") from None
    # READY=1, WATCHDOG=1, drain on SIGTERM, reload on SIGHUP: agent/lifecycle.py.
    return run_service(agent, _config_path(args.config))


def _broker_answers(broker: BrokerConfig, timeout: float = 3.0) -> tuple[bool, list[str]]:
    """Whether the broker accepts a connection made exactly as the daemon's (same TLS,
    client certificate and credentials), and lines saying so; never a secret."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgeinfer.agent.tls import security_from_config
    from edgeinfer.contract.transport import TransportError, describe_connect_error

    addr = parse_broker_url(broker.url)
    try:
        security = security_from_config(broker)
    except TransportError as exc:
        return False, [f"broker {addr}: {exc}"]
    lines = [f"broker {addr}: {security.describe(addr)}"]
    lines += [f"  ! {w}" for w in security.warnings(addr)]
    result: dict[str, str] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_connect(c: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        result.setdefault("refused" if rc.is_failure else "rc", str(rc))
        done.set()

    def on_disconnect(c: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        # A TLS 1.3 broker that rejects our certificate closes the link after the handshake.
        result.setdefault("lost", str(rc))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        security.apply(client, addr)
    except TransportError as exc:
        return False, [*lines, f"broker {addr}: {exc}"]
    try:
        client.connect(addr.host, addr.port, keepalive=10)
    except (TimeoutError, OSError) as exc:
        return False, [*lines, f"broker {addr}: unreachable ({describe_connect_error(exc)})"]
    client.loop_start()
    try:
        if not done.wait(timeout):
            return False, [*lines, f"broker {addr}: no CONNACK within {timeout}s"]
        if "rc" in result:
            return True, [*lines, f"broker {addr}: answers ({result['rc']})"]
        if "refused" in result:
            return False, [*lines, f"broker {addr}: refused the connection ({result['refused']})"]
        return False, [*lines, f"broker {addr}: closed the connection before CONNACK "
                               f"({result['lost']}; a rejected client certificate?)"]
    finally:
        client.disconnect()
        client.loop_stop()


def _cmd_doctor(args: argparse.Namespace) -> int:
    missing = missing_for_agent()
    if missing is not None:
        print(f"edge-agent: {missing}", file=sys.stderr)
        return os.EX_CONFIG
    from edgeinfer.runtimes.hardware import detect
    from edgeinfer.runtimes.selection import explain

    cfg = _load(args.config)
    print(version_line(PROG))
    print(f"config: OK (device {cfg.device_id}, state_dir {cfg.state_dir})")
    problems = environment_problems(cfg)
    for problem in problems:
        print(f"  ! {problem}")
    hw = detect()
    print("hardware:")
    for key, value in hw.summary().items():
        print(f"  {key}: {value}")
    for line in hw.errors:
        print(f"  ! {line}")
    print(f"runtime preference {', '.join(cfg.runtime.prefer)}:")
    for line in explain(cfg.runtime.prefer, hw):
        print(f"  {line}")
    from edgeinfer.runtimes.pipelines import pipeline_requirements

    print("task pipelines:")
    for task, missing in pipeline_requirements().items():
        print(f"  {task}: {'ready' if missing is None else 'unavailable: ' + missing}")
    # How the running agent's own link last ended, from its state dir: connecting with the
    # device's client id to find out would take the running agent's session over.
    from edgeinfer.agent import linkstate

    link_ok, lines = linkstate.doctor_lines(cfg.state_path, cfg.device_id,
                                            1.5 * cfg.broker.takeover_backoff_max_s)
    if lines:
        print("\n".join(lines))
    ok, lines = _broker_answers(cfg.broker)
    print("\n".join(lines))
    if ok:
        # Jobs through the broker, one in flight: a stall on small packets (Nagle) fails.
        from edgeinfer.agent.broker_probe import doctor_lines

        ok, lines = doctor_lines(cfg.broker, cfg.topic_prefix, cfg.device_id)
        print("\n".join(lines))
    return 0 if ok and link_ok and not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_version()
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help="YAML config file (default: $EDGE_AGENT_CONFIG or "
                     f"{DEFAULT_CONFIG_PATH} if present)")
    run.add_argument("--validate-config", action="store_true",
                     help="check the config and what it needs of this machine (state_dir "
                     "writable, TLS files readable, broker host resolves) and exit: 0 when "
                     "valid, 2 when not")
    doctor = sub.add_parser(
        "doctor", help="hardware, runtimes, config, broker reachability and job round trip",
        description="Print what this machine and config give the agent. Exit 1 when the "
        "config does not suit this machine, the broker does not answer, or jobs through it "
        "stall on small packets (a broker with Nagle on: set_tcp_nodelay true fixes it); "
        "2 on a config error.")
    doctor.add_argument("--config")
    sub.add_parser("version", help="print the installed version (as --version does)")
    args = parser.parse_args(argv)
    try:
        if args.command == "version":
            print(version_line(PROG))
            return 0
        if args.command == "doctor":
            return _cmd_doctor(args)
        return _cmd_run(args)
    except ConfigError as exc:
        print(f"edge-agent: config error: {exc}", file=sys.stderr)
        daemon = args.command == "run" and not args.validate_config
        return EXIT_RUN_CONFIG if daemon else EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
