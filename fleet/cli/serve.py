"""`edge-fleet serve`: run the controller (fleet/compose.py) until SIGINT or SIGTERM.

This module reads the flags and the fleet config into `ServeSettings` (flags, and
$EDGE_FLEET_BROKER, win over the config file, which wins over defaults), checks them in
the order that keeps a bad option from writing anything, and prints where each part
answers.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from edgeinfer.cliargs import Parser, UsageError
from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.topics import DEFAULT_PREFIX
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.cli.common import (
    add_artifact_dir_arg,
    add_registry_args,
    broker_security,
    default_sign_key,
    fleet_config,
    registry_of,
    signer,
    topic_prefix,
)
from edgeinfer.fleet.compose import ServeSettings, StartError, start_controller
from edgeinfer.fleet.fleetconfig import BROKER_ENV
from edgeinfer.fleet.signing import SIGNING_KEY_ENV


def add_serve_parser(sub: Any, common: Parser) -> None:
    p = sub.add_parser(
        "serve", parents=[common], help="run the controller: registry, artifacts, JSON API",
        description="Run the fleet controller until SIGINT or SIGTERM: keep every device's "
                    "state, reported, telemetry and events in the registry, and serve "
                    "GET/HEAD /artifacts/sha256/<hex> (ETag, Range) and /api/devices, "
                    "/api/models, /api/events over HTTP.",
    )
    add_artifact_dir_arg(p)
    p.add_argument("--host", default=None,
                   help="address to bind (default: the config's http.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: the config's http.port, else 8780)")
    add_registry_args(p)
    p.add_argument("--sign-key", type=Path, metavar="FILE",
                   default=default_sign_key(),
                   help=f"sign the manifests rollouts publish (default: ${SIGNING_KEY_ENV})")
    p.add_argument("--key-id", metavar="ID", help="the key id the signature names")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    # Signals first: a stop that comes while the servers start up must stop them cleanly.
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(args, stop)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _serve(args: argparse.Namespace, stop: threading.Event) -> int:
    cfg = fleet_config(args)
    rollout_signer = signer(args)  # before anything starts: a bad key is a usage error
    broker = args.broker
    if broker == DEFAULT_BROKER_URL and not os.environ.get(BROKER_ENV):
        broker = cfg.broker.url
    prefix = topic_prefix(args) if args.prefix != DEFAULT_PREFIX else cfg.prefix.strip("/")
    settings = ServeSettings(
        broker=broker, prefix=prefix, host=args.host or cfg.http.host,
        port=cfg.http.port if args.port is None else args.port,
        security=broker_security(args, broker),  # before the registry is opened (or made)
        client_id=cfg.broker.client_id, session_expiry_s=cfg.broker.session_expiry_s,
        keepalive_s=cfg.broker.keepalive_s, signer=rollout_signer,
    )
    store = ArtifactStore(args.artifact_dir or cfg.artifact_path())
    registry = registry_of(args, cfg)
    try:
        try:
            running = start_controller(registry, store, settings)
        except StartError as exc:
            raise UsageError(str(exc)) from None
        try:
            server = running.server
            print(f"serving {store.root} at {server.url}/artifacts/sha256/<hex> "
                  "(Ctrl-C to stop)", flush=True)
            print(f"controller: devices under {prefix}/dev/ on {running.controller.url}, "
                  f"registry {registry.url}, API at {server.url}/api/", flush=True)
            print(f"chunk server: mqtt:///artifacts/sha256/<hex> answered on "
                  f"{running.chunks.topic}", flush=True)
            stop.wait()
        finally:
            running.stop()
    finally:
        registry.close()
    return 0
