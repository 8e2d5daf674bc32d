"""`edge-fleet devices` (the table read from the broker's retained topics) and
`edge-fleet devices label` (labels in the registry, which rollouts select by)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgeinfer.cliargs import Parser, UsageError
from edgeinfer.fleet.cli.common import (
    add_registry_args,
    device_id,
    fleet_config,
    registry_of,
    topic_prefix,
)
from edgeinfer.fleet.devices import format_table, read_devices
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.registry import RegistryError, check_label
from edgeinfer.fleet.tls_options import security_from_args


def add_devices_parser(sub: Any, plain: Parser, common: Parser) -> None:
    p = sub.add_parser(
        "devices", parents=[common], help="list devices and what they serve",
        description="A table of every device's state, applied revision, models and last "
                    "error, read from the retained state, reported and desired topics.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_devices)
    devices_sub = p.add_subparsers(dest="devices_command", metavar="ACTION")
    d = devices_sub.add_parser(
        "label", parents=[plain], help="set or remove a device's labels (groups are label selectors)",
        description="Set KEY=VALUE labels on a device, or remove them with KEY-, in the "
                    "registry; with no labels, print the device's labels. Rollouts pick "
                    "devices by selectors over these labels, e.g. site=berlin,tier!=canary.",
    )
    d.add_argument("device", help="device id (it need not have connected yet)")
    d.add_argument("labels", nargs="*", metavar="KEY=VALUE|KEY-")
    add_registry_args(d)
    d.set_defaults(func=cmd_devices_label)


def cmd_devices(args: argparse.Namespace) -> int:
    prefix = topic_prefix(args)
    with connect(args.broker, security=security_from_args(args)) as conn:
        rows = read_devices(conn, prefix)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    elif not rows:
        print(f"no devices under {prefix}/dev/ on {args.broker}")
    else:
        print(format_table(rows))
    return 0


def cmd_devices_label(args: argparse.Namespace) -> int:
    device = device_id(args.device)
    set_: dict[str, str] = {}
    remove: list[str] = []
    for item in args.labels:
        if "=" in item:
            key, value = item.split("=", 1)
            set_[key] = value
        elif item.endswith("-"):
            remove.append(item[:-1])
        else:
            raise UsageError(f"{item!r}: say KEY=VALUE to set a label or KEY- to remove one")
    try:
        for key, value in [*set_.items(), *((key, "") for key in remove)]:
            check_label(key, value)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    registry = registry_of(args, fleet_config(args), create=bool(set_ or remove))
    try:
        if set_ or remove:
            labels = registry.set_labels(device, set_, remove)
        else:
            found = registry.device(device)
            labels = found.labels if found else {}
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    finally:
        registry.close()
    shown = " ".join(f"{k}={v}" for k, v in labels.items()) or "(no labels)"
    print(f"{device}: {shown}")
    return 0
