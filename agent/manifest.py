"""The desired-state manifest of DESIGN.md: typed, validated, canonically encoded."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from agent.topics import NAME_RE

SHA256_RE = r"^[0-9a-f]{64}$"

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
Sha256 = Annotated[str, msgspec.Meta(pattern=SHA256_RE)]


class RuntimePolicy(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Entries: "cuda", "openvino", "openvino:<DEVICE>", "onnxruntime".
    prefer: list[str] | None = None


class Batching(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    max_delay_ms: Annotated[float, msgspec.Meta(ge=0, le=10_000)] = 0.0


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    version: Name
    uri: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(ge=1)]
    task: Name = "tensor"
    format: Name = "onnx"
    runtime: RuntimePolicy = RuntimePolicy()
    batching: Batching = Batching()
    instances: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)


class Signature(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    alg: str
    key_id: str
    value: str


class Manifest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    revision: Annotated[int, msgspec.Meta(ge=0)]
    models: list[ModelSpec]
    issued_at: str | None = None
    expires_at: str | None = None
    signature: Signature | None = None


class ManifestError(ValueError):
    """A manifest that must be refused; the message says why."""


_URI_RE = re.compile(r"^(file|https?)://", re.IGNORECASE)

_decoder = msgspec.json.Decoder(Manifest)


def decode_manifest(payload: bytes) -> Manifest:
    """Parse and check a manifest; raises ManifestError with a reason a person can act on."""
    try:
        manifest = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"invalid manifest: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    seen: set[tuple[str, str]] = set()
    for m in manifest.models:
        if m.key in seen:
            raise ManifestError(f"model {m.name} version {m.version} is listed twice")
        seen.add(m.key)
        if not _URI_RE.match(m.uri):
            raise ManifestError(
                f"model {m.name}:{m.version}: unsupported artifact URI {m.uri!r} "
                "(expected file://, http:// or https://)"
            )
        if m.format != "onnx":
            raise ManifestError(f"model {m.name}:{m.version}: unsupported format {m.format!r}")
    return manifest


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes a signature covers."""
    raw = msgspec.json.encode(obj)
    return msgspec.json.encode(msgspec.json.decode(raw), order="sorted")


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.encode(manifest)
