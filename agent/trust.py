"""The keys this agent trusts to sign manifests: the `trust:` config section.

Kept light (cryptography is imported when keys are parsed) because the config module,
which `edge-agent version` and `--validate-config` import, holds this section.
`agent.verifier` uses the keys.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from edgeinfer.contract.topics import NAME_RE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PUBLIC_KEY_BYTES = 32


class TrustConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`trust:` in the agent config. Public keys are not secrets: they may sit in the YAML."""

    # key id -> base64 of the raw 32-byte ed25519 public key (what `edge-fleet keys
    # generate` prints and writes to <id>.pub).
    keys: dict[str, str] = msgspec.field(default_factory=dict)
    # key id -> path of a file holding that base64 text, or a PEM public key.
    key_files: dict[str, str] = msgspec.field(default_factory=dict)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A base64 raw ed25519 public key, or a PEM one; ValueError saying what is wrong."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - only when keys are parsed
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415

    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise ValueError(f"not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"a PEM {type(key).__name__}, not an ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (expected the base64 of a raw 32-byte ed25519 public key)") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"decodes to {len(raw)} bytes; an ed25519 public key has {PUBLIC_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_trusted_keys(trust: TrustConfig) -> dict[str, Ed25519PublicKey]:
    """The trusted keys by id; ValueError starting with the config key at fault."""
    keys: dict[str, Ed25519PublicKey] = {}
    for key_id, text in trust.keys.items():
        where = f"key 'trust.keys.{key_id}'"
        if not NAME_RE.match(key_id):
            raise ValueError(f"{where}: a key id must match {NAME_RE.pattern}")
        try:
            keys[key_id] = parse_public_key(text)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    for key_id, path in trust.key_files.items():
        where = f"key 'trust.key_files.{key_id}'"
        if not NAME_RE.match(key_id):
            raise ValueError(f"{where}: a key id must match {NAME_RE.pattern}")
        if key_id in keys:
            raise ValueError(f"{where}: key id {key_id!r} is also in trust.keys; name it once")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"{where}: cannot read {path}: {reason}") from None
        try:
            keys[key_id] = parse_public_key(text)
        except ValueError as exc:
            raise ValueError(f"{where}: {path}: {exc}") from None
    return keys
