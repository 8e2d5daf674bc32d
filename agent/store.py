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
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import msgspec

from agent.manifest import ModelSpec

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# Called with a stage name ("download", "verify", "install") as a fetch reaches it.
Checkpoint = Callable[[str], None]
# Opens the source of a spec's artifact for a URI scheme the store does not know itself
# (mqtt://: agent/mqtt_artifacts.py); given the spec and the whole download's timeout.
SourceOpener = Callable[[ModelSpec, float], contextlib.AbstractContextManager[BinaryIO]]


def _no_checkpoint(_stage: str) -> None:
    pass


class ArtifactError(Exception):
    """An artifact that cannot be fetched or does not match its manifest entry."""


def version_dir_name(spec: ModelSpec) -> str:
    """Names a version's folder by everything in it, so a folder never changes."""
    parts = [spec.sha256, *sorted(f"{f.name}={f.sha256}" for f in spec.files)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


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
        self.versions = state_dir / "models" / "versions"
        for folder in (self.root, self.tmp, self.versions):
            folder.mkdir(parents=True, exist_ok=True)
        # scheme -> opener, for sources registered by the service (e.g. "mqtt").
        self.sources: dict[str, SourceOpener] = {}

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

    def remove_unreferenced(self, serving: Iterable[ModelSpec]) -> list[str]:
        """Delete artifacts and version folders that no serving model needs."""
        specs = list(serving)
        keep = {sha for spec in specs for sha in (spec.sha256, *(f.sha256 for f in spec.files))}
        keep_dirs = {version_dir_name(spec) for spec in specs}
        removed = []
        for entry in self.root.iterdir():
            if entry.name not in keep:
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry.name)
        for folder in self.versions.iterdir():
            if folder.name not in keep_dirs:
                shutil.rmtree(folder, ignore_errors=True)
        return removed

    def version_dir(self, spec: ModelSpec) -> Path:
        """The version's folder: `model.onnx` and its files, as links into the store.

        Built once, beside its final place, and renamed into it: a folder that exists is
        complete. Pipelines read their side files (tokenizer, labels, other models) here.
        """
        final = self.versions / version_dir_name(spec)
        if final.is_dir():
            return final
        staging = Path(tempfile.mkdtemp(dir=self.versions, prefix=".staging-"))
        try:
            os.symlink(self.path_for(spec.sha256), staging / "model.onnx")
            for f in spec.files:
                os.symlink(self.path_for(f.sha256), staging / f.name)
            os.replace(staging, final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not final.is_dir():
                raise
        return final

    def fetch_files(self, spec: ModelSpec, timeout_s: float, max_bytes: int) -> None:
        """Fetch and verify the version's side files like the model itself."""
        for f in spec.files:
            self.fetch(msgspec.structs.replace(spec, uri=f.uri, sha256=f.sha256, size=f.size),
                       timeout_s, max_bytes)

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
                digest, size = _copy_verified(spec, out, timeout_s, checkpoint, self.sources)
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
    spec: ModelSpec, out: BinaryIO, timeout_s: float, checkpoint: Checkpoint,
    sources: dict[str, SourceOpener] | None = None,
) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + timeout_s
    finished = False
    opener = (sources or {}).get(urlsplit(spec.uri).scheme.lower())
    source = opener(spec, timeout_s) if opener else _open_source(spec.uri, timeout_s)
    with source as src, _Watchdog(src, deadline) as dog:
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
