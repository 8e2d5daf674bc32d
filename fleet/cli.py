"""`edge-fleet`: deploy models, list and label devices, push models, run a job, run the controller.

Exit codes: 0 done; 1 the fleet said no (deploy failed, job error, timeout);
2 the command cannot run (bad arguments, missing file, unreachable broker);
130 interrupted. Expected failures print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from edgeinfer.cliargs import Parser, UsageError, duration
from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.manifest import ModelSpec
from edgeinfer.contract.topics import DEFAULT_PREFIX, DEVICE_ID_RE, Topics, topic_prefix_problem
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.artifacts import Artifact, ArtifactStore, default_artifact_dir
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.deploy import (
    DeployError,
    artifact_uri,
    deploy,
    model_spec,
    parse_base_url,
    plan_artifact,
    store_artifact,
)
from edgeinfer.fleet.devices import format_table, read_devices
from edgeinfer.fleet.errors import InferenceError
from edgeinfer.fleet.fleetconfig import BROKER_ENV, CONFIG_ENV, ConfigError, FleetConfig, load_fleet_config
from edgeinfer.fleet.models import check_push, format_models_table, push_model
from edgeinfer.fleet.mqtt import BrokerError, connect
from edgeinfer.fleet.oip import InferResult, datatype_of
from edgeinfer.fleet.registry import (
    ModelConflict,
    RegistryError,
    SqlRegistry,
    check_label,
    open_registry,
)
from edgeinfer.fleet.signing import SIGNING_KEY_ENV, Signer, SigningError, generate_key, load_signer
from edgeinfer.fleet.tls_options import add_security_args, check_broker, security_from_args

PROG = "edge-fleet"


# -- arguments ------------------------------------------------------------------------


def _plain_options() -> Parser:
    """What every command takes."""
    plain = Parser(add_help=False)
    plain.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return plain


def _broker_options(plain: Parser) -> Parser:
    """What a command that talks to the broker takes besides: where it is, the topic prefix,
    TLS and credentials. Commands that never connect neither show nor accept them."""
    common = Parser(add_help=False, parents=[plain])
    common.add_argument(
        "--broker", metavar="URL", default=os.environ.get(BROKER_ENV) or DEFAULT_BROKER_URL,
        help=f"mqtt://host:port or mqtts://host:port (default: ${BROKER_ENV}, "
             f"else {DEFAULT_BROKER_URL})",
    )
    common.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help=f"topic prefix (default: {DEFAULT_PREFIX})")
    add_security_args(common)
    return common


def _artifact_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact-dir", type=Path, default=None, metavar="DIR",
                   help="content-addressed artifact store (default: $EDGE_FLEET_ARTIFACT_DIR, "
                        "else ~/.local/share/edgeinfer/artifacts)")


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   default=Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None,
                   help=f"fleet config (YAML; default: ${CONFIG_ENV})")
    p.add_argument("--db", metavar="URL",
                   help="registry: a SQLite file or postgresql://... (default: the config's "
                        "database, else <state_dir>/registry.sqlite3)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Operate an edgeinfer fleet over MQTT.")
    parser.add_version()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plain = _plain_options()
    common = _broker_options(plain)

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
    _artifact_dir_arg(p)
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
    p.add_argument("--sign-key", type=Path, metavar="FILE",
                   default=Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV)
                   else None,
                   help=f"sign the manifest with this ed25519 private key (default: "
                        f"${SIGNING_KEY_ENV}); agents with trusted keys need it")
    p.add_argument("--key-id", metavar="ID",
                   help="the key id the signature names (default: the key file's name "
                        "without .key)")
    p.add_argument("--rollback", action="store_true",
                   help="deploy a version older than the one the device serves, on purpose "
                        "(refused without it); the manifest, a higher revision as always, "
                        "says \"rollback\": true")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "keys", help="manifest signing keys",
        description="Make the ed25519 key pairs that sign manifests.",
    )
    keys_sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    k = keys_sub.add_parser(
        "generate", parents=[plain], help="make a key pair",
        description="Write ID.key (the private key, mode 0600, never overwritten) and ID.pub "
                    "(base64 of the raw public key) into DIR and print the public key. An "
                    "agent trusts it with `trust: {keys: {ID: <public key>}}`.",
    )
    k.add_argument("--key-id", required=True, metavar="ID", help="the key's id, e.g. fleet-1")
    k.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write")
    k.set_defaults(func=cmd_keys_generate)

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
    _registry_args(d)
    d.set_defaults(func=cmd_devices_label)

    p = sub.add_parser(
        "models", help="model versions in the registry",
        description="Push model files into the artifact store and the registry, and list "
                    "them. Talks to the registry directly (--db, or the config's database).",
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
    _registry_args(m)
    _artifact_dir_arg(m)
    m.set_defaults(func=cmd_models_push)
    m = models_sub.add_parser("list", parents=[plain], help="print the model versions",
                              description="A table (or JSON) of every stored model version.")
    m.add_argument("--name", metavar="NAME", help="only this model's versions")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _registry_args(m)
    m.set_defaults(func=cmd_models_list)

    p = sub.add_parser(
        "infer", parents=[common], help="send one inference job and print the result",
        description="Send one OIP v2 job built from a .npy or .npz file.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="send to this device")
    target.add_argument("--pool", help="send to any device of this pool")
    p.add_argument("--model", required=True, metavar="NAME")
    p.add_argument("--version", metavar="V", help="model version (default: the served one)")
    p.add_argument("--input", required=True, type=Path, metavar="FILE",
                   help=".npy (one tensor, named by --input-name) or .npz (keys are names)")
    p.add_argument("--input-name", metavar="NAME", help="the model input a .npy file feeds")
    p.add_argument("--output", action="append", metavar="NAME",
                   help="ask for this output only (repeatable; default: all)")
    p.add_argument("--timeout", type=duration, default=10.0, metavar="DURATION",
                   help="how long to wait for the answer, e.g. 10 (seconds), 500ms, 1m "
                        "(default: 10s)")
    p.add_argument("--json", action="store_true", help="print the raw OIP response")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "serve", parents=[common], help="run the controller: registry, artifacts, JSON API",
        description="Run the fleet controller until SIGINT or SIGTERM: keep every device's "
                    "state, reported, telemetry and events in the registry, and serve "
                    "GET/HEAD /artifacts/sha256/<hex> (ETag, Range) and /api/devices, "
                    "/api/models, /api/events over HTTP.",
    )
    _artifact_dir_arg(p)
    p.add_argument("--host", default=None,
                   help="address to bind (default: the config's http.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: the config's http.port, else 8780)")
    _registry_args(p)
    p.add_argument("--sign-key", type=Path, metavar="FILE",
                   default=Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV)
                   else None,
                   help=f"sign the manifests rollouts publish (default: ${SIGNING_KEY_ENV})")
    p.add_argument("--key-id", metavar="ID", help="the key id the signature names")
    p.set_defaults(func=cmd_serve)

    from edgeinfer.fleet.rollout_cli import add_rollout_parser  # it imports this module's helpers
    add_rollout_parser(sub, plain, common)
    from edgeinfer.fleet.simulate import add_simulate_parser  # it imports this module's helpers too
    add_simulate_parser(sub, common)
    return parser


def _prefix(args: argparse.Namespace) -> str:
    prefix = str(args.prefix).strip("/")
    problem = topic_prefix_problem(prefix)
    if problem is not None:
        raise UsageError(f"--prefix {args.prefix!r} {problem}")
    return prefix


def _device(device: str) -> str:
    if not DEVICE_ID_RE.match(device):
        raise UsageError(f"device id {device!r} must match {DEVICE_ID_RE.pattern}")
    return device


def _artifact_store(args: argparse.Namespace) -> ArtifactStore:
    return ArtifactStore(args.artifact_dir or default_artifact_dir())


# -- deploy ---------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    topics = Topics(_prefix(args), _device(args.device))
    if args.wait is not None and args.wait <= 0:
        raise UsageError("--wait needs a positive duration")
    # All that was given is checked before the artifact store gets a byte.
    spec, files = _deploy_entry(args)
    signer = _signer(args)
    security = _broker_security(args, args.broker)
    _store_files(files, _artifact_store(args))
    with connect(args.broker, security=security) as conn:
        outcome = deploy(conn, topics, upsert=spec, remove=args.remove, wait_s=args.wait,
                         signer=signer, rollback=args.rollback)
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
        given = [f for f in ("model", "version", "file", "rollback") if getattr(args, f)]
        if given:
            raise UsageError(f"--remove cannot be combined with --{', --'.join(given)}")
        return None, []
    missing = [f"--{f}" for f in ("model", "version", "file") if not getattr(args, f)]
    if missing:
        raise UsageError(f"deploy needs {', '.join(missing)} (or --remove NAME)")
    prefer = [p.strip() for p in args.prefer.split(",")] if args.prefer else None
    if prefer is not None and not all(prefer):
        raise UsageError(f"--prefer {args.prefer!r} has an empty entry")
    store = _artifact_store(args)
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
            instances=args.instances, health=_health(args.health),
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


def _broker_security(args: argparse.Namespace, broker: str) -> TransportSecurity:
    """The broker's TLS and credential options, checked with its URL before a command
    writes anything (the connection itself comes later)."""
    security = security_from_args(args)
    check_broker(broker, security)
    return security


def _signer(args: argparse.Namespace) -> Signer | None:
    if args.sign_key is None:
        if args.key_id:
            raise UsageError(f"--key-id needs --sign-key (or ${SIGNING_KEY_ENV})")
        return None
    try:
        return load_signer(args.sign_key, args.key_id)
    except SigningError as exc:
        raise UsageError(str(exc)) from None


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


def _health(path: Path | None) -> dict[str, Any] | None:
    return _json_object("--health", path)


# -- keys -----------------------------------------------------------------------------


def cmd_keys_generate(args: argparse.Namespace) -> int:
    try:
        files = generate_key(args.key_id, args.out)
    except SigningError as exc:
        raise UsageError(str(exc)) from None
    print(f"private key: {files.private} (mode 600; keep it off the devices)")
    print(f"public key:  {files.public}")
    print(f"agent config: trust: {{keys: {{{files.key_id}: {files.public_b64}}}}}")
    print(files.public_b64)
    return 0


# -- devices --------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace) -> int:
    prefix = _prefix(args)
    with connect(args.broker, security=security_from_args(args)) as conn:
        rows = read_devices(conn, prefix)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    elif not rows:
        print(f"no devices under {prefix}/dev/ on {args.broker}")
    else:
        print(format_table(rows))
    return 0


# -- infer ----------------------------------------------------------------------------


def load_inputs(path: Path, input_name: str | None) -> dict[str, np.ndarray[Any, Any]]:
    """Named input tensors from a .npy (with a name) or a .npz (names are its keys)."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as .npy/.npz: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            inputs = {k: loaded[k] for k in loaded.files}
        if input_name is not None:
            if input_name not in inputs:
                raise UsageError(f"{path} has no array {input_name!r} (has: {', '.join(inputs)})")
            inputs = {input_name: inputs[input_name]}
        if not inputs:
            raise UsageError(f"{path} holds no arrays")
        return inputs
    if input_name is None:
        raise UsageError(
            f"{path} holds one unnamed array: say which model input it feeds with "
            "--input-name (or use a .npz whose keys are the input names)"
        )
    return {input_name: np.asarray(loaded)}


def summarize(array: np.ndarray[Any, Any]) -> str:
    """Small tensors in full; large ones as range, mean and argmax over the last axis."""
    head = f"{datatype_of(array)} {list(array.shape)}"
    if array.size <= 16:
        return f"{head} {np.array2string(array, separator=', ', threshold=16)}"
    if array.dtype.kind not in "biuf":
        return f"{head} (first: {array.ravel()[0].item()!r})"
    parts = [head, f"min {array.min():.4g}", f"max {array.max():.4g}",
             f"mean {array.mean():.4g}"]
    if array.ndim >= 1:
        argmax = array.argmax(axis=-1).ravel()
        more = ", ..." if argmax.size > 10 else ""
        parts.append(f"argmax[-1] [{', '.join(str(i) for i in argmax[:10])}{more}]")
    return "  ".join(parts)


def _print_result(result: InferResult, round_trip_ms: float) -> None:
    p = result.parameters

    def ms(key: str) -> str:
        v = p.get(key)
        return f"{v:.2f}" if isinstance(v, (int, float)) else "?"

    print(f"{result.model_name}:{result.model_version} via {p.get('runtime', '?')}/"
          f"{p.get('device', '?')}: queue {ms('queue_ms')} ms, infer {ms('infer_ms')} ms, "
          f"round trip {round_trip_ms:.2f} ms")
    width = max((len(n) for n in result.outputs), default=0)
    for name, array in result.outputs.items():
        print(f"  {name.ljust(width)}  {summarize(array)}")


def cmd_infer(args: argparse.Namespace) -> int:
    prefix = _prefix(args)
    if args.device:
        _device(args.device)
    inputs = load_inputs(args.input, args.input_name)
    with InferenceClient(args.broker, prefix=prefix, security=security_from_args(args)) as client:
        started = time.perf_counter()
        try:
            result = client.infer(
                args.model, inputs, device=args.device, pool=args.pool, version=args.version,
                outputs=args.output, timeout=args.timeout,
            )
        except InferenceError as exc:
            if args.json and exc.response is not None:
                print(json.dumps(exc.response))
            print(f"{PROG}: job failed: {exc}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"{PROG}: {exc} (is the device online and serving {args.model}?)",
                  file=sys.stderr)
            return 1
        except ValueError as exc:  # inputs OIP cannot carry
            raise UsageError(str(exc)) from None
        round_trip_ms = (time.perf_counter() - started) * 1000
    if args.json:
        print(json.dumps(result.raw))
    else:
        _print_result(result, round_trip_ms)
    return 0


# -- registry: config, devices label, models -----------------------------------------


def _fleet_config(args: argparse.Namespace) -> FleetConfig:
    try:
        return load_fleet_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _open_registry(args: argparse.Namespace, cfg: FleetConfig, *,
                   create: bool = True) -> SqlRegistry:
    """create=False for a command that only reads: a registry not made yet reads as empty
    and is not made by reading it."""
    try:
        return open_registry(args.db or cfg.database_target(), max_events=cfg.events.keep,
                             create=create)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None


def cmd_devices_label(args: argparse.Namespace) -> int:
    device = _device(args.device)
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
    registry = _open_registry(args, _fleet_config(args), create=bool(set_ or remove))
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


def cmd_models_push(args: argparse.Namespace) -> int:
    try:
        check_push(args.file, name=args.name, version=args.version, task=args.task,
                   labels=args.labels)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    cfg = _fleet_config(args)
    store = ArtifactStore(args.artifact_dir or cfg.artifact_path())
    registry = _open_registry(args, cfg)
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
    registry = _open_registry(args, _fleet_config(args), create=False)
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


# -- serve ----------------------------------------------------------------------------


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
    from edgeinfer.contract.transport import TransportError
    from edgeinfer.fleet.controller import Controller
    from edgeinfer.fleet.http_api import Api, ControllerServer

    cfg = _fleet_config(args)
    rollout_signer = _signer(args)  # before anything starts: a bad key is a usage error
    # Flags (and $EDGE_FLEET_BROKER) win over the config file, which wins over defaults.
    broker = args.broker
    if broker == DEFAULT_BROKER_URL and not os.environ.get(BROKER_ENV):
        broker = cfg.broker.url
    prefix = _prefix(args) if args.prefix != DEFAULT_PREFIX else cfg.prefix.strip("/")
    host = args.host or cfg.http.host
    port = cfg.http.port if args.port is None else args.port
    store = ArtifactStore(args.artifact_dir or cfg.artifact_path())
    security = _broker_security(args, broker)  # before the registry is opened (or made)
    registry = _open_registry(args, cfg)
    try:
        controller = Controller(
            registry, broker, prefix=prefix, client_id=cfg.broker.client_id,
            security=security, session_expiry_s=cfg.broker.session_expiry_s,
            keepalive_s=cfg.broker.keepalive_s,
        )
    except (ValueError, TransportError) as exc:
        registry.close()
        raise UsageError(str(exc)) from None
    try:
        store.dir.mkdir(parents=True, exist_ok=True)
        server = ControllerServer(store, Api(registry, controller.status), host, port).start()
    except OSError as exc:
        registry.close()
        raise UsageError(f"cannot serve on {host}:{port}: {exc}") from None
    controller.start()
    # mqtt:///artifacts/sha256/<hex>: the same store in chunks over the broker.
    from edgeinfer.fleet.chunk_server import ChunkServer
    chunks = ChunkServer(store, broker, prefix=prefix, client_id=f"{cfg.broker.client_id}-artifacts",
                         security=security).start()
    # Rollouts (fleet/rollout.py) are driven here, from the registry: a restart resumes them.
    from edgeinfer.fleet.rollout import RolloutRunner
    rollouts = RolloutRunner(registry, lambda: connect(broker, security=security), prefix=prefix,
                             driver=cfg.broker.client_id, signer=rollout_signer).start()
    try:
        print(f"serving {store.root} at {server.url}/artifacts/sha256/<hex> "
              "(Ctrl-C to stop)", flush=True)
        print(f"controller: devices under {prefix}/dev/ on {controller.url}, registry "
              f"{registry.url}, API at {server.url}/api/", flush=True)
        print(f"chunk server: mqtt:///artifacts/sha256/<hex> answered on {chunks.topic}",
              flush=True)
        stop.wait()
    finally:
        server.shutdown()
        chunks.stop()
        rollouts.stop()
        controller.stop()
        registry.close()
    return 0


# -- entry point ----------------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(main())
