"""Manifest signing keys: generate, load, sign.

A key pair is two files named by its key id: `<id>.key`, the private key (PKCS#8 PEM,
mode 0600, created exclusively: an existing key is never overwritten), and `<id>.pub`,
the base64 of the raw 32-byte public key, the text an agent's `trust.keys.<id>` takes.

The signature covers the canonical JSON (RFC 8785, agent.manifest.canonical_json: the
agent verifies over the same function's bytes) of the manifest object exactly as
published, without `signature`; the published payload is that same object with
`signature` added, so every field the agent reads is covered.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeinfer.contract.manifest import Manifest, canonical_json, decode_manifest
from edgeinfer.contract.topics import NAME_RE

ALG = "ed25519"
SIGNING_KEY_ENV = "EDGE_FLEET_SIGNING_KEY"


class SigningError(Exception):
    """A key that cannot be made or used; the message says what to do."""


@dataclass(frozen=True)
class KeyFiles:
    key_id: str
    private: Path
    public: Path
    public_b64: str


def check_key_id(key_id: str) -> str:
    if not NAME_RE.match(key_id):
        raise SigningError(f"key id {key_id!r} must match {NAME_RE.pattern}")
    return key_id


def public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def generate_key(key_id: str, out_dir: Path) -> KeyFiles:
    """Write `<id>.key` (0600, never overwritten) and `<id>.pub` into `out_dir`."""
    check_key_id(key_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{key_id}.key", out_dir / f"{key_id}.pub"
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: a second `generate` must not destroy the key a fleet signs with.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{private_path} exists; remove it first or pick another key id") from None
    except OSError as exc:
        raise SigningError(f"cannot create {private_path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(private_path, 0o600)  # whatever the umask said
    pub = public_b64(key)
    public_path.write_text(pub + "\n", encoding="ascii")
    return KeyFiles(key_id, private_path, public_path, pub)


@dataclass(frozen=True)
class Signer:
    key_id: str
    key: Ed25519PrivateKey

    def sign(self, manifest: Manifest) -> bytes:
        """The payload to publish: the manifest as JSON with its `signature`."""
        obj: dict[str, Any] = msgspec.to_builtins(manifest)
        obj.pop("signature", None)
        value = self.key.sign(canonical_json(obj))
        obj["signature"] = {"alg": ALG, "key_id": self.key_id,
                            "value": base64.b64encode(value).decode()}
        payload = canonical_json(obj)
        decode_manifest(payload)  # what we publish must be what an agent reads
        return payload

    @property
    def public_b64(self) -> str:
        return public_b64(self.key)


def load_signer(path: Path, key_id: str | None = None) -> Signer:
    """The private key in `path` (PKCS#8 PEM), signing as `key_id` (default: the file's stem)."""
    key_id = check_key_id(key_id if key_id is not None else path.stem)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, not an ed25519 private key")
    mode = path.stat().st_mode & 0o077
    if mode:
        raise SigningError(
            f"{path} can be read by others (mode {path.stat().st_mode & 0o777:o}); "
            f"chmod 600 {path}"
        )
    return Signer(key_id, key)
