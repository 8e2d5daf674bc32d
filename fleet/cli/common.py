"""What the `edge-fleet` commands share: the option groups every command or every
broker-talking command takes, and the checks that turn a flag into a value or a one-line
`UsageError` (prefix, device id, broker security, signing key, fleet config, registry).

Nothing here prints or exits: `edgeinfer.fleet.cli.main` turns a `UsageError` into
`edge-fleet COMMAND: message` and exit code 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgeinfer.cliargs import Parser, UsageError
from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.topics import DEFAULT_PREFIX, DEVICE_ID_RE, topic_prefix_problem
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.artifacts import ArtifactStore, default_artifact_dir
from edgeinfer.fleet.fleetconfig import BROKER_ENV, CONFIG_ENV, ConfigError, FleetConfig, load_fleet_config
from edgeinfer.fleet.registry import RegistryError, SqlRegistry, open_registry
from edgeinfer.fleet.signing import SIGNING_KEY_ENV, Signer, SigningError, load_signer
from edgeinfer.fleet.tls_options import add_security_args, check_broker, security_from_args

PROG = "edge-fleet"


# -- option groups --------------------------------------------------------------------


def plain_options() -> Parser:
    """What every command takes."""
    plain = Parser(add_help=False)
    plain.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return plain


def broker_options(plain: Parser) -> Parser:
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


def add_artifact_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact-dir", type=Path, default=None, metavar="DIR",
                   help="content-addressed artifact store (default: $EDGE_FLEET_ARTIFACT_DIR, "
                        "else ~/.local/share/edgeinfer/artifacts)")


def add_registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   default=Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None,
                   help=f"fleet config (YAML; default: ${CONFIG_ENV})")
    p.add_argument("--db", metavar="URL",
                   help="registry: a SQLite file or postgresql://... (default: the config's "
                        "database, else <state_dir>/registry.sqlite3)")


def default_sign_key() -> Path | None:
    """--sign-key's default: $EDGE_FLEET_SIGNING_KEY, read when the parser is built."""
    return Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV) else None


# -- checked values -------------------------------------------------------------------


def topic_prefix(args: argparse.Namespace) -> str:
    """--prefix without surrounding slashes, or a UsageError saying what is wrong with it."""
    prefix = str(args.prefix).strip("/")
    problem = topic_prefix_problem(prefix)
    if problem is not None:
        raise UsageError(f"--prefix {args.prefix!r} {problem}")
    return prefix


def device_id(device: str) -> str:
    if not DEVICE_ID_RE.match(device):
        raise UsageError(f"device id {device!r} must match {DEVICE_ID_RE.pattern}")
    return device


def artifact_store(args: argparse.Namespace) -> ArtifactStore:
    """--artifact-dir, else the default store (commands without a fleet config)."""
    return ArtifactStore(args.artifact_dir or default_artifact_dir())


def broker_security(args: argparse.Namespace, broker: str) -> TransportSecurity:
    """The broker's TLS and credential options, checked with its URL before a command
    writes anything (the connection itself comes later)."""
    security = security_from_args(args)
    check_broker(broker, security)
    return security


def signer(args: argparse.Namespace) -> Signer | None:
    """--sign-key/--key-id as a Signer; None when no key is given."""
    if args.sign_key is None:
        if args.key_id:
            raise UsageError(f"--key-id needs --sign-key (or ${SIGNING_KEY_ENV})")
        return None
    try:
        return load_signer(args.sign_key, args.key_id)
    except SigningError as exc:
        raise UsageError(str(exc)) from None


def fleet_config(args: argparse.Namespace) -> FleetConfig:
    try:
        return load_fleet_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def registry_of(args: argparse.Namespace, cfg: FleetConfig, *, create: bool = True) -> SqlRegistry:
    """--db, else the config's database. create=False for a command that only reads: a
    registry not made yet reads as empty and is not made by reading it."""
    try:
        return open_registry(args.db or cfg.database_target(), max_events=cfg.events.keep,
                             create=create)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
