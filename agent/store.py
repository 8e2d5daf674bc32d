"""Content-addressed model store under `state_dir`, and the artifact fetcher that fills it.

An artifact is downloaded into `tmp/`, hashed and counted while it streams,
fsynced, and renamed to `models/sha256/<hex>` only when its size and sha256
match the manifest. A file at its final path is therefore always complete.
A download has one deadline for the whole of it (`deploy.download_timeout_s`),
not only a timeout per read: a server that trickles bytes is cut off too.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from agent.manifest import ModelSpec

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# Called with a stage name ("download", "verify", "install") as a fetch reaches it.
Checkpoint = Callable[[str], None]


def _no_checkpoint(_stage: str) -> None:
    pass


class ArtifactError(Exception):
    """An artifact that cannot be fetched or does not match its manifest entry."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, before_replace: Callable[[], None] | None = None) -> None:
    """Write-then-rename, fsynced: a reader sees the old bytes or the new, never a mix.

    The temporary file is `.<name>.<random>.tmp` beside `path` (see `remove_stale_temps`);
    `before_replace` runs when it is complete, just before the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(path: Path) -> int:
    """Remove what an `atomic_write(path, ...)` killed half-way left beside `path`."""
    count = 0
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
            count += 1
    return count


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

    def fetch(
        self, spec: ModelSpec, timeout_s: float, max_bytes: int,
        checkpoint: Checkpoint = _no_checkpoint,
    ) -> Path:
        """Make the artifact of `spec` present and verified in the store; return its path.

        `timeout_s` bounds the whole download. `checkpoint` is told the stages
        "download", "verify" and "install" as they are reached (agent.faults).
        """
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
                digest, size = _copy_verified(spec, out, timeout_s, checkpoint)
                out.flush()
                os.fsync(out.fileno())
            checkpoint("verify")
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
            checkpoint("install")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return final


def _copy_verified(
    spec: ModelSpec, out: BinaryIO, timeout_s: float, checkpoint: Checkpoint
) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + timeout_s
    finished = False
    with _open_source(spec.uri, timeout_s) as src, _Watchdog(src, deadline) as dog:
        while time.monotonic() <= deadline:
            try:
                chunk = src.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                if dog.fired:
                    break  # the watchdog cut the connection: reported below
                raise ArtifactError(f"download of {spec.uri} failed: {exc}") from None
            if dog.fired:
                break  # what the read returned may be cut short
            if not chunk:
                finished = True
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
            if size == len(chunk):
                checkpoint("download")
    if not finished:
        raise ArtifactError(
            f"download of {spec.name}:{spec.version} from {spec.uri} did not finish within "
            f"deploy.download_timeout_s={timeout_s:g}s ({size} of {spec.size} bytes arrived)"
        )
    return hasher.hexdigest(), size


class _Watchdog:
    """Cuts a network source off at the deadline, even while a read blocks in the kernel.

    A socket timeout bounds each read, not the download: a server that sends a byte
    every few seconds would hold a download for ever. At the deadline this shuts the
    connection down (through a duplicate of its descriptor, the public way to reach the
    socket under urllib's response), which ends a blocked read at once.
    """

    def __init__(self, src: BinaryIO, deadline: float) -> None:
        self._src = src
        self._lock = threading.Lock()
        self._active = True
        self.fired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._active = False
        self._timer.cancel()

    def _fire(self) -> None:
        with self._lock:  # the source stays open while we hold it: the descriptor is its own
            if not self._active:
                return
            self.fired = True
            try:
                fd = os.dup(self._src.fileno())
            except (OSError, ValueError, AttributeError):
                return  # no descriptor: the check between reads ends it
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)  # not a socket (a file://): the check between reads ends it
                return
            with sock, contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


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
