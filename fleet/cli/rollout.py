"""`edge-fleet rollout start|status|pause|resume|abort`.

`start` records the rollout in the registry; the controller (`edge-fleet serve`) drives
it. Without a controller, `--drive` makes this command the driver until the rollout ends
(it then also ingests the devices' reports, as the controller would). `--wait` (implied by
`--drive`) shows progress until the rollout ends: exit 0 when it completed, 1 when it
halted, rolled back or was aborted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from edgeinfer.cliargs import Parser, UsageError, duration
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.artifacts import Artifact, ArtifactStore, artifact_url
from edgeinfer.fleet.cli.common import (
    PROG,
    add_artifact_dir_arg,
    add_registry_args,
    broker_security,
    default_sign_key,
    fleet_config,
    registry_of,
    signer,
    topic_prefix,
)
from edgeinfer.fleet.compose import RolloutDriver, StartError
from edgeinfer.fleet.deploy import model_spec, parse_base_url
from edgeinfer.fleet.fleetconfig import FleetConfig
from edgeinfer.fleet.registry import RegistryError, SqlRegistry, parse_selector
from edgeinfer.fleet.rollout import (
    DEFAULT_INSTALL_TIMEOUT_S,
    RUNNING,
    TERMINAL,
    Progress,
    Rollout,
    RolloutError,
    RolloutStore,
    parse_amount,
    parse_health,
    parse_waves,
    progress,
)
from edgeinfer.fleet.signing import SIGNING_KEY_ENV, Signer


def add_rollout_parser(sub: Any, plain: Parser, common: Parser) -> None:
    """`plain`: the options of every command; `common`: those plus the broker's, for the
    actions that may talk to it (--drive)."""
    p = sub.add_parser(
        "rollout", help="roll a model version out to a group of devices in waves",
        description="Roll NAME:VERSION out to the devices of a label selector wave by wave, "
                    "watching install failures and the health gate; halt or roll back "
                    "automatically. State lives in the registry; `edge-fleet serve` drives.",
    )
    rsub = p.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)

    s = rsub.add_parser(
        "start", parents=[common], help="record a new rollout (the controller drives it)",
        description="Record a rollout of a pushed model version (`edge-fleet models push`) "
                    "to the group. Waves are cumulative: 1,10%,50%,100% means one device, "
                    "then a tenth of the group, ...; a last 100% is added when missing.",
    )
    s.add_argument("target", metavar="NAME:VERSION")
    s.add_argument("--group", required=True, metavar="SELECTOR",
                   help="label selector, e.g. site=berlin,tier!=canary ('' = every device)")
    s.add_argument("--waves", default="1,10%,50%,100%",
                   help="cumulative wave sizes, counts or percentages (default: 1,10%%,50%%,100%%)")
    s.add_argument("--max-failures", default="0", metavar="N|P%",
                   help="install failures tolerated before the rollout halts (default: 0)")
    s.add_argument("--health", default="", metavar="RULES",
                   help="health gate during the bake, e.g. error_rate<1%%,p95_ms<50 "
                        "(metrics: error_rate, p50_ms, p95_ms, p99_ms)")
    s.add_argument("--bake", type=duration, default="60s", metavar="DURATION",
                   help="how long each wave is watched before the next, e.g. 90 (seconds), "
                        "60s, 2m (default: 60s)")
    s.add_argument("--install-timeout", type=duration,
                   default=f"{DEFAULT_INSTALL_TIMEOUT_S:g}s", metavar="DURATION",
                   help="a device not serving the version after this counts as failed "
                        f"(default: {DEFAULT_INSTALL_TIMEOUT_S:g}s)")
    s.add_argument("--prefer", metavar="LIST", help="runtime preference for the manifest entry")
    s.add_argument("--artifact-base-url", metavar="URL",
                   help="point devices at http://host:port/artifacts/sha256/<hex> (the "
                        "controller's HTTP server) instead of a file:// path")
    add_artifact_dir_arg(s)
    add_registry_args(s)
    _drive_args(s)
    s.set_defaults(func=cmd_rollout_start)

    st = rsub.add_parser("status", parents=[plain], help="show rollouts",
                         description="One rollout with its devices, or every rollout.")
    st.add_argument("id", type=int, nargs="?", help="rollout id (default: list all)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--wait", action="store_true", help="show progress until it ends")
    add_registry_args(st)
    st.set_defaults(func=cmd_rollout_status)

    for action, text in (("pause", "stop advancing (devices keep what they have)"),
                         ("resume", "go on (a bake in progress starts over)"),
                         ("abort", "stop and roll every touched device back")):
        # pause never drives, so it never talks to the broker.
        parents = [plain] if action == "pause" else [common]
        a = rsub.add_parser(action, parents=parents, help=text, description=text.capitalize())
        a.add_argument("id", type=int)
        add_registry_args(a)
        if action != "pause":
            _drive_args(a)
        a.set_defaults(func=cmd_rollout_control, action=action)


def _drive_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="show progress until the rollout ends")
    p.add_argument("--drive", action="store_true",
                   help="drive the rollout from here until it ends (when no controller runs)")
    p.add_argument("--poll", type=duration, default=0.5, metavar="DURATION",
                   help=argparse.SUPPRESS)
    p.add_argument("--sign-key", type=Path, metavar="FILE",
                   default=default_sign_key(),
                   help=f"with --drive: sign manifests with this key (default: ${SIGNING_KEY_ENV})")
    p.add_argument("--key-id", metavar="ID", help="the key id the signature names")


# -- commands -------------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> tuple[FleetConfig, SqlRegistry, RolloutStore]:
    """Every action needs a registry that holds a model or a rollout already: one not
    made yet reads as empty (and the action fails) rather than being made."""
    cfg = fleet_config(args)
    registry = registry_of(args, cfg, create=False)
    try:
        return cfg, registry, RolloutStore(registry)
    except RegistryError as exc:
        registry.close()
        raise UsageError(str(exc)) from None


def cmd_rollout_start(args: argparse.Namespace) -> int:
    name, sep, version = args.target.partition(":")
    if not sep or not name or not version:
        raise UsageError(f"{args.target!r}: say NAME:VERSION, e.g. digits:4")
    try:
        selector = str(parse_selector(args.group))
        waves = [str(w) for w in parse_waves(args.waves)]
        parse_amount(args.max_failures, "--max-failures")
        health = ",".join(str(r) for r in parse_health(args.health))
        base_url = parse_base_url(args.artifact_base_url) if args.artifact_base_url else None
    except (RolloutError, RegistryError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    bake_s, install_s = args.bake, args.install_timeout
    if install_s <= 0:
        raise UsageError("--install-timeout must be positive")
    prefer = [x.strip() for x in args.prefer.split(",")] if args.prefer else None
    driving = _driving(args)  # a bad key or broker option is told before anything is recorded
    cfg, registry, store = _store(args)
    try:
        model = registry.model(name, version)
        if model is None:
            raise UsageError(f"no model {name}:{version} in {registry.url}: "
                             "push it first (edge-fleet models push)")
        artifacts = ArtifactStore(args.artifact_dir or cfg.artifact_path())
        artifact = artifacts.get(model.sha256)
        if base_url is not None:
            uri = artifact_url(base_url, model.sha256)
        elif artifact is not None:
            uri = artifact.path.as_uri()
        else:
            raise UsageError(f"{name}:{version} (sha256 {model.sha256[:12]}) is not in the "
                             f"artifact store {artifacts.root}: give --artifact-dir or "
                             "--artifact-base-url")
        if artifact is None:
            artifact = Artifact(model.sha256, model.size, artifacts.path_for(model.sha256))
        try:
            spec = model_spec(name=name, version=version, artifact=artifact, uri=uri,
                              task=model.task, prefer=prefer)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        r = store.create(Rollout(
            id=0, model=name, version=version, sha256=model.sha256,
            spec=msgspec.to_builtins(spec), selector=selector, waves=waves,
            max_failures=args.max_failures.strip(), health=health, bake_s=bake_s,
            install_timeout_s=install_s))
        print(f"rollout {r.id}: {r.target} to {selector or '(all devices)'} in waves "
              f"{','.join(waves)}, max failures {r.max_failures}, health "
              f"{health or '(none)'}, bake {bake_s:g}s", flush=True)
        if driving is not None:
            return _drive(args, driving, registry, store, r.id)
        if args.wait:
            return _watch(store, r.id, args.poll)
        print(f"the controller (edge-fleet serve) drives it; follow it with "
              f"`{PROG} rollout status {r.id} --wait`")
        return 0
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    finally:
        registry.close()


def cmd_rollout_status(args: argparse.Namespace) -> int:
    _cfg, registry, store = _store(args)
    try:
        if args.id is None:
            rollouts = store.all()
            if args.json:
                print(json.dumps([r.as_json() for r in rollouts], indent=2))
            elif not rollouts:
                print(f"no rollouts in {registry.url}")
            for r in rollouts if not args.json else []:
                print(progress(store, r.id).line())
            return 0
        if args.wait:
            return _watch(store, args.id, 0.5)
        prog = progress(store, args.id)
        if args.json:
            print(json.dumps({**prog.rollout.as_json(), "group_size": prog.group_size,
                              "devices": [d.as_json() for d in prog.devices]}, indent=2))
        else:
            print(prog.line())
            for d in prog.devices:
                extra = f"  {d.error}" if d.error else ""
                back = " (rolled back)" if d.reverted else ""
                print(f"  wave {d.wave + 1}  {d.device_id}  {d.state}{back}{extra}")
        return 0
    except (RolloutError, RegistryError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        registry.close()


def cmd_rollout_control(args: argparse.Namespace) -> int:
    driving = _driving(args)
    _cfg, registry, store = _store(args)
    try:
        r = store.control(args.id, args.action)
        print(f"rollout {r.id}: {r.status}")
        if driving is not None:
            return _drive(args, driving, registry, store, r.id)
        if getattr(args, "wait", False):
            return _watch(store, r.id, args.poll)
        return 0
    except (RolloutError, RegistryError) as exc:
        raise UsageError(str(exc)) from None
    finally:
        registry.close()


# -- driving and watching -------------------------------------------------------------------


class _Driving(NamedTuple):
    """What --drive needs, checked before the rollout is recorded or changed."""

    signer: Signer | None
    security: TransportSecurity
    prefix: str


def _driving(args: argparse.Namespace) -> _Driving | None:
    if not getattr(args, "drive", False):  # pause has no --drive
        return None
    return _Driving(signer(args), broker_security(args, args.broker), topic_prefix(args))


def _drive(args: argparse.Namespace, driving: _Driving, registry: SqlRegistry,
           store: RolloutStore, rollout_id: int) -> int:
    """Drive the rollout from here (fleet/compose.py's RolloutDriver) until it ends."""
    try:
        driver = RolloutDriver(registry, args.broker, prefix=driving.prefix,
                               security=driving.security, signer=driving.signer,
                               rollout_id=rollout_id, tick_s=min(args.poll, 1.0))
    except StartError as exc:
        raise UsageError(str(exc)) from None
    try:
        try:
            driver.start()
        except StartError as exc:
            raise UsageError(str(exc)) from None
        return _watch(store, rollout_id, args.poll)
    finally:
        driver.stop()


def _watch(store: RolloutStore, rollout_id: int, poll_s: float) -> int:
    """Progress bars (tqdm, when installed) until the rollout ends; the exit code."""
    bars = _Bars()
    try:
        while True:
            prog = progress(store, rollout_id)
            bars.show(prog)
            if prog.rollout.status in TERMINAL:
                break
            time.sleep(poll_s)
    finally:
        bars.close()
    print(prog.line())
    return 0 if prog.rollout.status == "completed" else 1


class _Bars:
    """A devices bar and a bake bar; plain lines when tqdm is missing or output is no TTY."""

    def __init__(self) -> None:
        try:
            from tqdm import tqdm  # noqa: PLC0415 (optional: the `fleet` extra)
        except ImportError:  # the `fleet` extra is not installed
            tqdm = None
        self._tqdm = tqdm
        self._devices: Any = None
        self._bake: Any = None
        self._bake_wave: int | None = None
        self._last = ""

    def show(self, prog: Progress) -> None:
        r = prog.rollout
        if self._tqdm is None or not sys.stderr.isatty():
            line = prog.line()
            if line != self._last:
                print(line, file=sys.stderr, flush=True)
                self._last = line
            return
        if self._devices is None:
            self._devices = self._tqdm(total=prog.group_size, unit="dev", position=0,
                                       desc=f"rollout {r.id} {r.target}")
        self._devices.total = max(prog.group_size, 1)
        self._devices.n = prog.serving + prog.failed
        self._devices.set_postfix_str(
            f"wave {r.wave + 1}/{len(r.waves)} {r.phase if r.status == RUNNING else r.status}, "
            f"{prog.failed} failed")
        left = prog.bake_left(time.time())
        if left is not None:
            if self._bake is None or self._bake_wave != r.wave:
                if self._bake is not None:
                    self._bake.close()
                self._bake = self._tqdm(total=round(r.bake_s, 1), unit="s", position=1,
                                        desc=f"bake wave {r.wave + 1}", leave=False)
                self._bake_wave = r.wave
            self._bake.n = round(max(r.bake_s - left, 0.0), 1)
            self._bake.refresh()

    def close(self) -> None:
        for bar in (self._bake, self._devices):
            if bar is not None:
                bar.close()
