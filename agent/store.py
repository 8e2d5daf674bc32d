"""Content-addressed model store under `state_dir`, and the artifact fetcher that fills it.

An artifact is downloaded into `tmp/`, hashed and counted while it streams,
fsynced, and renamed to `models/sha256/<hex>` only when its size and sha256
match the manifest. A file at its final path is therefore always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from agent.manifest import ModelSpec

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact that cannot be fetched or does not match its manifest entry."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename, fsynced: a reader sees the old bytes or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class ModelStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "models" / "sha256"
        self.tmp = state_dir / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256

    def has(self, spec: ModelSpec) -> bool:
        path = self.path_for(spec.sha256)
        try:
            return path.stat().st_size == spec.size
        except FileNotFoundError:
            return False

    def clear_tmp(self) -> int:
        """Remove what an interrupted download left; returns how many files."""
        count = 0
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
                count += 1
        return count

    def remove_unreferenced(self, keep: set[str]) -> list[str]:
        removed = []
        for entry in self.root.iterdir():
            if entry.name not in keep:
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry.name)
        return removed

    def fetch(self, spec: ModelSpec, timeout_s: float, max_bytes: int) -> Path:
        """Make the artifact of `spec` present and verified in the store; return its path."""
        final = self.path_for(spec.sha256)
        if self.has(spec):
            return final
        if spec.size > max_bytes:
            raise ArtifactError(
                f"artifact of {spec.name}:{spec.version} is {spec.size} bytes, "
                f"over the limit of {max_bytes}"
            )
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix=f"{spec.sha256[:16]}.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = _copy_verified(spec, out, timeout_s)
                out.flush()
                os.fsync(out.fileno())
            if size != spec.size:
                raise ArtifactError(
                    f"artifact of {spec.name}:{spec.version} has {size} bytes, "
                    f"the manifest says {spec.size}"
                )
            if digest != spec.sha256:
                raise ArtifactError(
                    f"artifact of {spec.name}:{spec.version} has sha256 {digest}, "
                    f"the manifest says {spec.sha256}"
                )
            os.replace(tmp, final)
            fsync_dir(self.root)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return final


def _copy_verified(spec: ModelSpec, out: BinaryIO, timeout_s: float) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with _open_source(spec.uri, timeout_s) as src:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > spec.size:
                # Stop reading at once: a source longer than promised is refused.
                raise ArtifactError(
                    f"artifact of {spec.name}:{spec.version} is longer than the "
                    f"{spec.size} bytes the manifest says"
                )
            hasher.update(chunk)
            out.write(chunk)
    return hasher.hexdigest(), size


@contextlib.contextmanager
def _open_source(uri: str, timeout_s: float) -> Iterator[BinaryIO]:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = Path(unquote(parts.path))
        try:
            f = path.open("rb")
        except OSError as exc:
            raise ArtifactError(f"cannot read {uri}: {exc.strerror}") from None
        with f:
            yield f
        return
    if scheme in ("http", "https"):
        try:
            resp = urllib.request.urlopen(uri, timeout=timeout_s)  # noqa: S310 - scheme checked
        except urllib.error.HTTPError as exc:
            raise ArtifactError(f"cannot download {uri}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ArtifactError(f"cannot download {uri}: {reason}") from None
        with resp:
            try:
                yield resp
            except TimeoutError:
                raise ArtifactError(f"download of {uri} stalled for {timeout_s}s") from None
        return
    raise ArtifactError(f"unsupported artifact URI scheme in {uri!r}")
