"""What the registry raises: one base class, so that callers catch `RegistryError` once."""

from __future__ import annotations


class RegistryError(Exception):
    """A registry operation was refused (bad input, conflicting model version)."""


class ModelConflict(RegistryError):
    """name:version exists with other bytes: versions are immutable."""


class RegistryUnavailable(RegistryError):
    """The database cannot be reached or written right now; worth retrying."""
