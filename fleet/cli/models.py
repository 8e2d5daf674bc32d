"""`edge-fleet models push|list`: model versions in the artifact store and the registry;
`edge-fleet models describe`: what a model takes and returns, asked of a device over MQTT."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from edgeinfer.cliargs import Parser, UsageError, duration
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.cli.common import (
    PROG,
    add_artifact_dir_arg,
    add_registry_args,
    device_id,
    fleet_config,
    registry_of,
    topic_prefix,
)
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InferenceError
from edgeinfer.fleet.models import check_push, format_metadata_table, format_models_table, push_model
from edgeinfer.fleet.registry import ModelConflict, RegistryError
from edgeinfer.fleet.tls_options import security_from_args


def add_models_parser(sub: Any, plain: Parser, common: Parser) -> None:
    p = sub.add_parser(
        "models", help="model versions in the registry, and what a device's model takes",
        description="Push model files into the artifact store and the registry, and list "
                    "them (these talk to the registry directly: --db, or the config's "
                    "database); describe a model a device serves (asked over MQTT).",
    )
    models_sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    m = models_sub.add_parser(
        "push", parents=[plain], help="store a model version",
        description="Store FILE content-addressed (sha256) and record NAME:VERSION. The same "
                    "bytes again change nothing; other bytes under an existing NAME:VERSION "
                    "are refused (exit 1): a version names one set of bytes forever.",
    )
    m.add_argument("file", type=Path, metavar="FILE", help="the model (ONNX)")
    m.add_argument("--name", required=True, metavar="NAME")
    m.add_argument("--version", required=True, metavar="V")
    m.add_argument("--task", default="tensor", help="task pipeline (default: tensor)")
    m.add_argument("--labels", type=Path, metavar="FILE",
                   help="class labels file, stored next to the model")
    add_registry_args(m)
    add_artifact_dir_arg(m)
    m.set_defaults(func=cmd_models_push)
    m = models_sub.add_parser("list", parents=[plain], help="print the model versions",
                              description="A table (or JSON) of every stored model version.")
    m.add_argument("--name", metavar="NAME", help="only this model's versions")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_registry_args(m)
    m.set_defaults(func=cmd_models_list)
    m = models_sub.add_parser(
        "describe", parents=[common], help="print a served model's inputs and outputs",
        description="Ask a device what a model it serves takes and returns (OIP's model "
                    "metadata: each input's and output's name, datatype and shape, -1 for "
                    "any size) and print it. Exit 1 when the device does not serve it or "
                    "does not answer.",
    )
    m.add_argument("--device", required=True, help="the device to ask")
    m.add_argument("--model", required=True, metavar="NAME")
    m.add_argument("--version", metavar="V",
                   help="model version (default: the one a job naming none gets)")
    m.add_argument("--timeout", type=duration, default=10.0, metavar="DURATION",
                   help="how long to wait for the answer, e.g. 10 (seconds), 500ms "
                        "(default: 10s)")
    m.add_argument("--json", action="store_true", help="print the raw OIP answer")
    m.set_defaults(func=cmd_models_describe)


def cmd_models_push(args: argparse.Namespace) -> int:
    try:
        check_push(args.file, name=args.name, version=args.version, task=args.task,
                   labels=args.labels)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    cfg = fleet_config(args)
    store = ArtifactStore(args.artifact_dir or cfg.artifact_path())
    registry = registry_of(args, cfg)
    try:
        outcome = push_model(registry, store, args.file, name=args.name, version=args.version,
                             task=args.task, labels=args.labels)
    except ModelConflict as exc:
        print(f"{PROG} models push: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot store {args.file}: {exc}") from None
    finally:
        registry.close()
    m = outcome.model
    if outcome.created:
        print(f"stored {m.name}:{m.version} sha256 {m.sha256} ({m.size} bytes, task {m.task}) "
              f"in {store.root}")
    else:
        print(f"{m.name}:{m.version} is already stored with these bytes (sha256 {m.sha256}): "
              "nothing to do")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    registry = registry_of(args, fleet_config(args), create=False)
    try:
        found = registry.models(args.name)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    finally:
        registry.close()
    if args.json:
        print(json.dumps([m.as_json() for m in found], indent=2))
    elif not found:
        print(f"no models in {registry.url}")
    else:
        print(format_models_table(found))
    return 0


def cmd_models_describe(args: argparse.Namespace) -> int:
    prefix = topic_prefix(args)
    device = device_id(args.device)
    with InferenceClient(args.broker, prefix=prefix, security=security_from_args(args)) as client:
        try:
            meta = client.metadata(args.model, device=device, version=args.version,
                                   timeout=args.timeout)
        except InferenceError as exc:
            if args.json and exc.response is not None:
                print(json.dumps(exc.response))
            print(f"{PROG} models describe: {exc}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"{PROG} models describe: {exc} (is {device} online?)", file=sys.stderr)
            return 1
        except ValueError as exc:  # a model name or version outside the alphabet
            raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(msgspec.to_builtins(meta)))
    else:
        print(format_metadata_table(meta))
    return 0
