"""Content-addressed artifact store (`<dir>/sha256/<hex>`) and its HTTP server.

A file's name is its sha256, so a URL names exactly one content: agents verify what
they fetch against the manifest, and the server can let caches keep files forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

ARTIFACT_DIR_ENV = "EDGE_FLEET_ARTIFACT_DIR"
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
# The only paths served; anything else (including `..` tricks) is a 404.
_URL_PATH_RE = re.compile(r"^/artifacts/sha256/([0-9a-f]{64})$")
_CHUNK = 1 << 20
_RANGE_RE = re.compile(r"^(\d*)-(\d*)$")


def default_artifact_dir() -> Path:
    env = os.environ.get(ARTIFACT_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "edgeinfer" / "artifacts"


def artifact_url(base_url: str, sha256: str) -> str:
    """`http://host:port/artifacts/sha256/<hex>` under a server's base URL."""
    return f"{base_url.rstrip('/')}/artifacts/sha256/{sha256}"


@dataclass(frozen=True)
class Artifact:
    sha256: str
    size: int
    path: Path


class ArtifactStore:
    """Files named by their sha256 under `<root>/sha256/`, written atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.dir = self.root / "sha256"

    def path_for(self, sha256: str) -> Path:
        if not _HEX_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.dir / sha256

    def get(self, sha256: str) -> Artifact | None:
        path = self.path_for(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return Artifact(sha256, st.st_size, path)

    def put_file(self, src: Path | str) -> Artifact:
        """Copy `src` in; returns its digest, size and stored path.

        Hashing happens while copying, into a temp file in the same directory that is
        fsynced and renamed: a reader never sees a partial file under a digest name.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", dir=self.dir)
        tmp = Path(tmp_name)
        try:
            with Path(src).open("rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            # mkstemp makes 0600; the agent may run as another user and read file:// URIs.
            tmp.chmod(0o644)
            sha = digest.hexdigest()
            final = self.dir / sha
            if final.exists():
                tmp.unlink()  # same name, same content: keep the one already there
            else:
                tmp.replace(final)
                _fsync_dir(self.dir)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return Artifact(sha, size, final)


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """A `Range` header against a file of `size` bytes.

    Returns (start, length) for one satisfiable byte range, "unsatisfiable" (answer 416)
    for a malformed or out-of-file byte range, None to ignore the header and send the
    whole file (another unit, or several ranges, which this server does not combine).
    """
    unit, sep, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not sep:
        return None
    if "," in spec:
        return None
    m = _RANGE_RE.match(spec.strip())
    if m is None:
        return "unsatisfiable"
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return "unsatisfiable"
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        n = min(n, size)
        return size - n, n
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    end = min(end, size - 1)
    return start, end - start + 1


def _etag_matches(header: str | None, etag: str, *, absent: bool = False) -> bool:
    """Whether an If-None-Match / If-Range value names `etag` (`*` names any)."""
    if header is None:
        return absent
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


def _copy(src: Any, dst: Any, length: int) -> None:
    while length > 0:
        chunk = src.read(min(_CHUNK, length))
        if not chunk:
            return
        dst.write(chunk)
        length -= len(chunk)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse to open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ArtifactHandler(BaseHTTPRequestHandler):
    server: ArtifactServer
    server_version = "edgeinfer-artifacts"

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, *, send_body: bool) -> None:
        match = _URL_PATH_RE.match(urlsplit(self.path).path)
        artifact = self.server.store.get(match.group(1)) if match else None
        if artifact is None or not artifact.path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "no such artifact")
            return
        etag = f'"{artifact.sha256}"'
        if _etag_matches(self.headers.get("If-None-Match"), etag):
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        try:
            f = artifact.path.open("rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "no such artifact")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            wanted = self.headers.get("Range")
            if wanted is not None and not _etag_matches(self.headers.get("If-Range"), etag,
                                                        absent=True):
                wanted = None  # If-Range names other content: send it all (RFC 9110 13.1.5)
            span = parse_range(wanted, size) if wanted is not None else None
            if span == "unsatisfiable":
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.send_header("ETag", etag)
                self.end_headers()
                return
            start, length = (span if isinstance(span, tuple) else (0, size))
            if isinstance(span, tuple):
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {start}-{start + length - 1}/{size}")
            else:
                self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            # Content-addressed: the bytes behind this URL never change.
            self.send_header("Cache-Control", "public, max-age=31536000, immutable")
            self.end_headers()
            if send_body:
                f.seek(start)
                _copy(f, self.wfile, length)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class ArtifactServer(ThreadingHTTPServer):
    """Serves GET/HEAD /artifacts/sha256/<hex> from an ArtifactStore."""

    daemon_threads = True  # a stalled download must not keep the process alive
    handler_class: type[BaseHTTPRequestHandler] = ArtifactHandler  # the controller's adds /api/

    def __init__(self, store: ArtifactStore, host: str, port: int) -> None:
        self.store = store
        super().__init__((host, port), self.handler_class)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def start(self) -> ArtifactServer:
        # A short poll interval makes shutdown() quick; the cost is an idle wakeup.
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="artifacts",
            daemon=True,
        )
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            super().shutdown()
            self._thread.join(5.0)
            self._thread = None
        self.server_close()


def serve_artifacts(directory: Path | str, host: str = "127.0.0.1", port: int = 8780
                    ) -> ArtifactServer:
    """Start serving `directory` in a background thread (port 0 picks a free one)."""
    return ArtifactServer(ArtifactStore(directory), host, port).start()
