"""`edge-fleet keys generate`: an ed25519 key pair for signing manifests."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeinfer.cliargs import Parser, UsageError
from edgeinfer.fleet.signing import SigningError, generate_key


def add_keys_parser(sub: Any, plain: Parser) -> None:
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
