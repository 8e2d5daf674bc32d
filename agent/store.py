"""Content-addressed model store under `state_dir`, and the artifact fetcher that fills it.

An artifact is downloaded into `tmp/`, hashed and counted while it streams,
fsynced, and renamed to `models/sha256/<hex>` only when its size and sha256
match the manifest. A file at its final path is therefore always complete.
A download has one deadline for the whole of it (`deploy.download_timeout_s`), from
connecting through the response header to the last byte, not only a timeout per read: a
server that trickles its header or its body is cut off too. A `DownloadCut` also ends a
download early when someone else decides to (the reconciler, when a newer manifest
supersedes the one being applied).
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
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import msgspec

from edgeinfer.contract.manifest import ModelSpec

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# Called with a stage name ("download", "verify", "install") as a fetch reaches it.
Checkpoint = Callable[[str], None]
# Opens the source of a spec's artifact for a URI scheme the store does not know itself
# (mqtt://: agent/chunk_client.py); given the spec, the whole download's timeout and the
# cut that, once fired, must end a blocked read soon (the source checks `cut.fired`).
SourceOpener = Callable[[ModelSpec, float, "DownloadCut"],
                        contextlib.AbstractContextManager[BinaryIO]]


def _no_checkpoint(_stage: str) -> None:
    pass


class ArtifactError(Exception):
    """An artifact that cannot be fetched or does not match its manifest entry.

    `cause` is "deadline" when deploy.download_timeout_s ran out, "cut" when the download
    was ended on purpose (DownloadCut.fire), None otherwise.
    """

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class DownloadCut:
    """Ends a download from another thread: at its deadline, or when told to.

    A socket timeout bounds each read, not the download: a server that sends one byte of
    its header every second would hold a download for ever. The HTTP connections a fetch
    opens register their sockets here as soon as they are connected; `fire` shuts each one
    down (through a duplicate of its descriptor, so the owner's object is left alone),
    which ends a read blocked in the kernel at once. Sources without a socket (mqtt://,
    file://) look at `fired` between reads.

    `deadline` (time.monotonic) is that of the artifact being fetched now, set by
    `ModelStore.fetch`: whoever waits for the fetch may give up on it then, too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._fired = threading.Event()
        self.cause: str | None = None
        self.deadline: float | None = None

    @property
    def fired(self) -> bool:
        return self._fired.is_set()

    def fire(self, cause: str) -> None:
        """Cut every connection now and any opened later; the first cause given sticks."""
        with self._lock:
            if self.cause is None:
                self.cause = cause
            self._fired.set()
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)

    def attach(self, sock: socket.socket) -> None:
        """Follow a connected socket; raises OSError if the cut has already fired."""
        with self._lock:
            if not self._fired.is_set():
                self._sockets.append(sock)
                return
        _shut(sock)
        raise OSError(f"download cut ({self.cause})")

    def detach(self, sock: socket.socket) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._sockets.remove(sock)


def _shut(sock: socket.socket) -> None:
    try:
        fd = os.dup(sock.fileno())
    except OSError:
        return  # already closed: nothing to cut
    with socket.socket(fileno=fd) as dup, contextlib.suppress(OSError):
        dup.shutdown(socket.SHUT_RDWR)


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

    def fetch_files(self, spec: ModelSpec, timeout_s: float, max_bytes: int,
                    cut: DownloadCut | None = None) -> None:
        """Fetch and verify the version's side files like the model itself."""
        for f in spec.files:
            self.fetch(msgspec.structs.replace(spec, uri=f.uri, sha256=f.sha256, size=f.size),
                       timeout_s, max_bytes, cut=cut)

    def fetch(
        self, spec: ModelSpec, timeout_s: float, max_bytes: int,
        checkpoint: Checkpoint = _no_checkpoint, cut: DownloadCut | None = None,
    ) -> Path:
        """Make the artifact of `spec` present and verified in the store; return its path.

        `timeout_s` bounds the whole download, connecting included. `cut`, when given and
        fired, ends it early (ArtifactError with cause "cut"). `checkpoint` is told the
        stages "download", "verify" and "install" as they are reached (agent.faults).
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
                digest, size = _copy_verified(spec, out, timeout_s, checkpoint, self.sources,
                                              cut or DownloadCut())
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
    sources: dict[str, SourceOpener], cut: DownloadCut,
) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + timeout_s
    cut.deadline = deadline
    if cut.fired:
        raise ArtifactError(f"download of {spec.name}:{spec.version} cut ({cut.cause})", "cut")
    # Started before connecting: the deadline covers connect, response header and body.
    timer = threading.Timer(timeout_s, cut.fire, args=("deadline",))
    timer.daemon = True
    timer.start()
    try:
        opener = sources.get(urlsplit(spec.uri).scheme.lower())
        source = opener(spec, timeout_s, cut) if opener else _open_source(spec.uri, timeout_s, cut)
        with source as src:
            while not cut.fired:
                chunk = src.read(CHUNK)
                if cut.fired:
                    break  # what the read returned may be cut short
                if not chunk:
                    return hasher.hexdigest(), size
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
    except (OSError, http.client.HTTPException) as exc:
        if not cut.fired:
            raise ArtifactError(f"download of {spec.uri} failed: {exc}") from None
        # the cut ended the connection (or the source saw it fire): reported below
    except ArtifactError:
        if not cut.fired:
            raise
    finally:
        timer.cancel()
    if cut.cause == "deadline":
        raise ArtifactError(
            f"download of {spec.name}:{spec.version} from {spec.uri} did not finish within "
            f"deploy.download_timeout_s={timeout_s:g}s ({size} of {spec.size} bytes arrived)",
            "deadline",
        )
    raise ArtifactError(
        f"download of {spec.name}:{spec.version} from {spec.uri} cut ({cut.cause}) after "
        f"{size} of {spec.size} bytes", "cut",
    )


class _CutHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket a DownloadCut follows from the moment it connects."""

    cut: DownloadCut

    def connect(self) -> None:
        super().connect()
        if self.sock is not None:
            self.cut.attach(self.sock)


class _CutHTTPSConnection(http.client.HTTPSConnection):
    """The same for HTTPS; followed once the TLS handshake is done (the socket timeout, the
    time left, bounds each step of the handshake before that)."""

    cut: DownloadCut

    def connect(self) -> None:
        super().connect()
        if self.sock is not None:
            self.cut.attach(self.sock)


def _opener(cut: DownloadCut) -> urllib.request.OpenerDirector:
    """urllib as usual (proxies from the environment, redirects), on connections `cut`
    follows: each one a redirect or a proxy opens is cut too."""

    def http_class(base: type[Any]) -> Callable[..., Any]:
        def make(*args: Any, **kwargs: Any) -> Any:
            conn = base(*args, **kwargs)
            conn.cut = cut
            return conn
        return make

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(http_class(_CutHTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        # No context given: the connection makes Python's default one, as urlopen does.
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(http_class(_CutHTTPSConnection), req)

    return urllib.request.build_opener(Http(), Https())


@contextlib.contextmanager
def _open_source(uri: str, timeout_s: float, cut: DownloadCut) -> Iterator[BinaryIO]:
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
            # The socket timeout bounds a connect; the cut bounds everything after it.
            resp = _opener(cut).open(uri, timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            raise ArtifactError(f"cannot download {uri}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if cut.fired:
                raise OSError(f"download cut ({cut.cause})") from None  # said by the caller
            reason = getattr(exc, "reason", exc)
            raise ArtifactError(f"cannot download {uri}: {reason}") from None
        with resp:
            yield resp
        return
    raise ArtifactError(f"unsupported artifact URI scheme in {uri!r}")
