"""`edge-fleet deploy`: publish a device's next desired manifest with one model added,
replaced or removed, after storing its files in the artifact store; `--wait` follows the
device until it serves the model or fails (exit 1)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeinfer.cliargs import Parser, UsageError, duration
from edgeinfer.contract.manifest import ModelSpec
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.abtest import VersionsError, parse_traffic
from edgeinfer.fleet.artifacts import Artifact, ArtifactStore
from edgeinfer.fleet.cli.common import (
    add_artifact_dir_arg,
    artifact_store,
    broker_security,
    default_sign_key,
    device_id,
    signer,
    topic_prefix,
)
from edgeinfer.fleet.deploy import (
    artifact_uri,
    deploy,
    model_spec,
    parse_base_url,
    plan_artifact,
    store_artifact,
)
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.signing import SIGNING_KEY_ENV


def add_deploy_parser(sub: Any, common: Parser) -> None:
    p = sub.add_parser(
        "deploy", parents=[common], help="deploy a model version to a device, or remove one",
        description="Publish the device's next desired manifest with one model added, "
                    "replaced (same name) or removed; other models stay.",
    )
    p.add_argument("--device", required=True, help="device id")
    p.add_argument("--model", metavar="NAME", help="model name to deploy")
    p.add_argument("--version", metavar="V", help="model version to deploy")
    p.add_argument("--file", type=Path, metavar="PATH", help="the model file (ONNX)")
    p.add_argument("--remove", metavar="NAME", help="remove this model instead")
    p.add_argument("--task", default="tensor", help="task pipeline (default: tensor)")
    p.add_argument("--prefer", metavar="LIST",
                   help="runtime preference, comma-separated, e.g. cuda,openvino,onnxruntime")
    p.add_argument("--max-batch", type=int, metavar="N", help="largest batch the agent forms")
    p.add_argument("--max-delay-ms", type=float, metavar="MS",
                   help="how long the agent waits to fill a batch")
    p.add_argument("--instances", type=int, metavar="N",
                   help="jobs of this model that run at once, the cores shared between them "
                   "(default 1)")
    add_artifact_dir_arg(p)
    p.add_argument("--artifact-base-url", metavar="URL",
                   help="point the device at http://host:port/artifacts/sha256/<hex> "
                        "(an `edge-fleet serve`) instead of a file:// path; `mqtt://` "
                        "points it at mqtt:///artifacts/sha256/<hex>: chunks over its own "
                        "broker from `edge-fleet serve`'s chunk server")
    p.add_argument("--wait", type=duration, metavar="DURATION",
                   help="wait this long for the device to serve the model (or fail), "
                        "e.g. 60 (seconds), 60s, 2m")
    p.add_argument("--with", dest="with_files", action="append", default=[],
                   metavar="NAME=PATH",
                   help="a file installed beside the model in its version's folder "
                        "(tokenizer.json, labels.txt, ...); repeatable")
    p.add_argument("--settings", type=Path, metavar="FILE",
                   help="JSON file with the task pipeline's settings (docs/pipelines.md)")
    p.add_argument("--health", type=Path, metavar="FILE",
                   help="JSON file with the model's health gate: {\"inputs\": [...], "
                        "\"expected\": [...], \"rtol\", \"atol\", \"max_latency_ms\"}")
    p.add_argument("--sign-key", type=Path, metavar="FILE", default=default_sign_key(),
                   help=f"sign the manifest with this ed25519 private key (default: "
                        f"${SIGNING_KEY_ENV}); agents with trusted keys need it")
    p.add_argument("--key-id", metavar="ID",
                   help="the key id the signature names (default: the key file's name "
                        "without .key)")
    p.add_argument("--rollback", action="store_true",
                   help="deploy a version older than the one the device serves, on purpose "
                        "(refused without it); the manifest, a higher revision as always, "
                        "says \"rollback\": true")
    p.add_argument("--traffic", action="append", default=[], metavar="VERSION=WEIGHT",
                   help="A/B: serve these versions of --model side by side, each taking "
                        "WEIGHT percent of the jobs that name no version (adding up to "
                        "100); each is --version or one in the desired manifest; repeatable")
    p.add_argument("--shadow", metavar="VERSION",
                   help="serve this version of --model as a shadow: a copy of each job, "
                        "its answers compared and never sent (--version, or one in the "
                        "desired manifest)")
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    topics = Topics(topic_prefix(args), device_id(args.device))
    if args.wait is not None and args.wait <= 0:
        raise UsageError("--wait needs a positive duration")
    # All that was given is checked before the artifact store gets a byte.
    spec, files = _deploy_entry(args)
    try:
        traffic = parse_traffic(args.traffic)
    except VersionsError as exc:
        raise UsageError(str(exc)) from None
    manifest_signer = signer(args)
    security = broker_security(args, args.broker)
    _store_files(files, artifact_store(args))
    with connect(args.broker, security=security) as conn:
        outcome = deploy(conn, topics, upsert=spec, remove=args.remove, wait_s=args.wait,
                         signer=manifest_signer, rollback=args.rollback,
                         traffic=traffic, shadow=args.shadow)
    what = (f"removed {args.remove}" if spec is None else
            f"{spec.name}:{spec.version} sha256 {spec.sha256[:12]} ({spec.size} bytes) "
            f"from {spec.uri}")
    print(f"published revision {outcome.manifest.revision} to {outcome.topic}: {what}")
    if outcome.wait is None:
        return 0
    print(outcome.wait.message, file=sys.stdout if outcome.wait.ok else sys.stderr)
    return 0 if outcome.wait.ok else 1


def _deploy_entry(args: argparse.Namespace) -> tuple[ModelSpec | None, list[tuple[Path, Artifact]]]:
    """The manifest entry to add (None with --remove) and the files it needs stored,
    checked in full; nothing is written yet."""
    if args.remove:
        given = [f for f in ("model", "version", "file", "rollback", "traffic", "shadow")
                 if getattr(args, f)]
        if given:
            raise UsageError(f"--remove cannot be combined with --{', --'.join(given)}")
        return None, []
    missing = [f"--{f}" for f in ("model", "version", "file") if not getattr(args, f)]
    if missing:
        raise UsageError(f"deploy needs {', '.join(missing)} (or --remove NAME)")
    prefer = [p.strip() for p in args.prefer.split(",")] if args.prefer else None
    if prefer is not None and not all(prefer):
        raise UsageError(f"--prefer {args.prefer!r} has an empty entry")
    store = artifact_store(args)
    try:
        base_url = parse_base_url(args.artifact_base_url) if args.artifact_base_url else None
        artifact = plan_artifact(args.file, store)
        files = [(args.file, artifact)]
        side_files = []
        for item in args.with_files:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--with {item!r}: expected NAME=PATH")
            extra = plan_artifact(Path(path), store)
            files.append((Path(path), extra))
            side_files.append((name, extra, artifact_uri(extra, base_url)))
        spec = model_spec(
            name=args.model, version=args.version, artifact=artifact,
            uri=artifact_uri(artifact, base_url), task=args.task, prefer=prefer,
            max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
            instances=args.instances, health=_json_object("--health", args.health),
            settings=_json_object("--settings", args.settings), files=side_files,
        )
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return spec, files


def _store_files(files: list[tuple[Path, Artifact]], store: ArtifactStore) -> None:
    for src, planned in files:
        try:
            stored = store_artifact(src, store)
        except (ValueError, OSError) as exc:
            raise UsageError(str(exc)) from None
        if stored.sha256 != planned.sha256:
            raise UsageError(f"{src} changed while it was stored: deploy it again")


def _json_object(flag: str, path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"{flag} {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{flag} {path} must hold a JSON object")
    return doc
