"""Which manifests this agent accepts: ed25519 signatures by trusted keys, revisions that only
move forward, no expiry.

With trusted keys configured (`trust.keys` and/or `trust.key_files`, by key id; several at
once so that a key can be rotated), a manifest must carry
`"signature": {"alg": "ed25519", "key_id": <id>, "value": <base64 of 64 bytes>}` made by
one of them over `Published.signed_bytes`.

Revisions only move forward. A manifest whose revision is lower than the one this agent
has applied is refused (`rollback`): with keys always, without keys unless
`deploy.allow_rollback` says otherwise. A manifest with the applied revision is the one
already applied, delivered again (every reconnect does it): with the same content
(`Published.digest`) it is accepted and changes nothing; with other content it is refused
(`reused_revision`) when keys are configured, since a signed manifest is only ever
replaced by a higher revision. A deliberate rollback is the older content under a new,
higher revision (`edge-fleet deploy --rollback` marks it `"rollback": true`).

A manifest past its `expires_at` is refused whether or not keys are configured, unless it
is the applied manifest delivered again (a retained manifest read again after a restart
changes nothing).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeinfer.contract.manifest import ManifestError, Published, parse_rfc3339

ALG = "ed25519"
SIGNATURE_BYTES = 64


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ManifestVerifier:
    """Accepts or refuses a published manifest; refusals are ManifestError with a `reason`."""

    def __init__(
        self, keys: Mapping[str, Ed25519PublicKey], clock: Callable[[], datetime] = _utc_now,
        *, allow_rollback: bool = False,
    ) -> None:
        self._keys = dict(keys)
        self._clock = clock
        # Ignored with keys: a signed fleet never needs a lower revision (see the docstring).
        self._allow_rollback = allow_rollback

    @property
    def enforcing(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def check(self, published: Published, applied_revision: int | None,
              applied_digest: str | None = None) -> None:
        """Refuse `published` (ManifestError) unless this agent may apply it.

        `applied_revision` and `applied_digest` describe the manifest applied now; a digest
        of None (state written before digests were kept) takes the same revision as the
        applied manifest delivered again.
        """
        manifest = published.manifest
        if self._keys:
            self._check_signature(published)
        again = manifest.revision == applied_revision and applied_digest in (
            None, published.digest)
        if applied_revision is not None and manifest.revision < applied_revision and (
                self._keys or not self._allow_rollback):
            raise ManifestError(
                f"revision {manifest.revision} is lower than the applied revision "
                f"{applied_revision}: revisions only move forward (publish the older content "
                "under a higher revision: edge-fleet deploy --rollback)",
                "rollback",
            )
        if self._keys and manifest.revision == applied_revision and not again:
            raise ManifestError(
                f"revision {manifest.revision} is the applied revision with other content: "
                "a signed manifest is replaced only by a higher revision",
                "reused_revision",
            )
        if manifest.expires_at is not None and not again:
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
