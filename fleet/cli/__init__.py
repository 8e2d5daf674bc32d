"""`edge-fleet`: deploy models, list and label devices, push models, run a job, run the
controller, roll out, simulate devices.

Exit codes: 0 done; 1 the fleet said no (deploy failed, job error, timeout);
2 the command cannot run (bad arguments, missing file, unreachable broker);
130 interrupted. Expected failures print one line, never a traceback.

This module builds the root parser from one module per command (deploy, keys, devices,
models, infer, serve, rollout, simulate; their shared options and checks are in
common.py) and turns what a command raises into that exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edgeinfer.cliargs import Parser, UsageError
from edgeinfer.fleet.cli.common import PROG, broker_options, plain_options
from edgeinfer.fleet.cli.deploy import add_deploy_parser
from edgeinfer.fleet.cli.devices import add_devices_parser
from edgeinfer.fleet.cli.infer import add_infer_parser
from edgeinfer.fleet.cli.keys import add_keys_parser
from edgeinfer.fleet.cli.models import add_models_parser
from edgeinfer.fleet.cli.rollout import add_rollout_parser
from edgeinfer.fleet.cli.serve import add_serve_parser
from edgeinfer.fleet.cli.simulate import add_simulate_parser
from edgeinfer.fleet.deploy import DeployError
from edgeinfer.fleet.mqtt import BrokerError

__all__ = ["PROG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Operate an edgeinfer fleet over MQTT.")
    parser.add_version()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plain = plain_options()
    common = broker_options(plain)
    add_deploy_parser(sub, common)
    add_keys_parser(sub, plain)
    add_devices_parser(sub, plain, common)
    add_models_parser(sub, plain, common)
    add_infer_parser(sub, common)
    add_serve_parser(sub, common)
    add_rollout_parser(sub, plain, common)
    add_simulate_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    except DeployError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
