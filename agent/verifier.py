"""Which manifests this agent accepts: ed25519 signatures by trusted keys, no rollback, no expiry.

With trusted keys configured (`trust.keys` and/or `trust.key_files`, by key id; several at
once so that a key can be rotated), a manifest must carry
`"signature": {"alg": "ed25519", "key_id": <id>, "value": <base64 of 64 bytes>}` made by
one of them over `Published.signed_bytes`, and its revision must not be lower than the
revision this agent has applied. A manifest past its `expires_at` is refused whether or
not keys are configured, unless it is the revision already applied (a retained manifest
read again after a restart changes nothing).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.manifest import ManifestError, Published, parse_rfc3339

ALG = "ed25519"
SIGNATURE_BYTES = 64


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ManifestVerifier:
    """Accepts or refuses a published manifest; refusals are ManifestError with a `reason`."""

    def __init__(
        self, keys: Mapping[str, Ed25519PublicKey], clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self._keys = dict(keys)
        self._clock = clock

    @property
    def enforcing(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def check(self, published: Published, applied_revision: int | None) -> None:
        manifest = published.manifest
        if self._keys:
            self._check_signature(published)
            if applied_revision is not None and manifest.revision < applied_revision:
                raise ManifestError(
                    f"revision {manifest.revision} is lower than the applied revision "
                    f"{applied_revision}: a rollback is refused (publish a higher revision)",
                    "rollback",
                )
        if manifest.expires_at is not None and manifest.revision != applied_revision:
            expires = parse_rfc3339(manifest.expires_at)  # checked when decoded
            now = self._clock()
            if now >= expires:
                raise ManifestError(
                    f"revision {manifest.revision} expired at {manifest.expires_at} "
                    f"(now {now.isoformat(timespec='seconds')})",
                    "expired",
                )

    def _check_signature(self, published: Published) -> None:
        sig = published.manifest.signature
        trusted = ", ".join(self.key_ids)
        if sig is None:
            raise ManifestError(
                f"the manifest is not signed; this agent only accepts manifests signed by "
                f"key(s) {trusted}",
                "unsigned",
            )
        if sig.alg != ALG:
            raise ManifestError(
                f"signature algorithm {sig.alg!r} is not supported (expected {ALG!r})",
                "unsupported_algorithm",
            )
        key = self._keys.get(sig.key_id)
        if key is None:
            raise ManifestError(
                f"signed with key {sig.key_id!r}, which this agent does not trust "
                f"(trusted: {trusted})",
                "unknown_key",
            )
        try:
            value = base64.b64decode(sig.value, validate=True)
        except (binascii.Error, ValueError):
            raise ManifestError("signature value is not base64", "bad_signature") from None
        if len(value) != SIGNATURE_BYTES:
            raise ManifestError(
                f"signature value has {len(value)} bytes; an ed25519 signature has "
                f"{SIGNATURE_BYTES}",
                "bad_signature",
            )
        try:
            key.verify(value, published.signed_bytes)
        except InvalidSignature:
            raise ManifestError(
                f"the signature by key {sig.key_id!r} does not match the manifest's content "
                "(altered after signing, or signed by another key)",
                "bad_signature",
            ) from None
