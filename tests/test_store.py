"""The content-addressed store: verified, atomic, never half-written."""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgeinfer.agent.store import ArtifactError, DownloadCut, ModelStore, atomic_write, remove_stale_temps
from edgeinfer.contract.manifest import ModelSpec
from tests.slowhttp import SlowServer


def spec_for(uri: str, data: bytes, **over: object) -> ModelSpec:
    fields: dict[str, object] = {
        "name": "m", "version": "1", "uri": uri,
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
    }
    fields.update(over)
    return ModelSpec(**fields)  # type: ignore[arg-type]


def test_file_artifact_is_installed_by_content(tmp_path: Path) -> None:
    data = b"model-bytes" * 1000
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    store = ModelStore(tmp_path / "state")
    spec = spec_for(src.as_uri(), data)
    path = store.fetch(spec, 5, 10**9)
    assert path == store.root / spec.sha256
    assert path.read_bytes() == data
    assert store.has(spec)
    assert list(store.tmp.iterdir()) == []
    src.unlink()  # a second fetch does not read the source again
    assert store.fetch(spec, 5, 10**9) == path


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"sha256": "0" * 64}, "has sha256"),
        ({"size": 5}, "longer than"),
        ({"size": 999_999}, "has 11000 bytes"),
    ],
)
def test_mismatch_is_refused_and_leaves_nothing(tmp_path: Path, over: dict[str, object],
                                                needle: str) -> None:
    data = b"model-bytes" * 1000
    src = tmp_path / "m.onnx"
    src.write_bytes(data)
    store = ModelStore(tmp_path / "state")
    spec = spec_for(src.as_uri(), data, **over)
    with pytest.raises(ArtifactError, match=needle):
        store.fetch(spec, 5, 10**9)
    assert list(store.root.iterdir()) == []
    assert list(store.tmp.iterdir()) == []


def test_limits_and_missing_sources(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    data = b"x" * 100
    with pytest.raises(ArtifactError, match="over the limit"):
        store.fetch(spec_for("file:///nonexistent", data), 5, 10)
    with pytest.raises(ArtifactError, match="cannot read"):
        store.fetch(spec_for("file:///nonexistent", data), 5, 1000)


class _Handler(BaseHTTPRequestHandler):
    body = b"http-model" * 500

    def do_GET(self) -> None:
        if self.path != "/a":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_http_artifact(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        store = ModelStore(tmp_path / "state")
        spec = spec_for(f"{base}/a", _Handler.body)
        assert store.fetch(spec, 5, 10**9).read_bytes() == _Handler.body
        with pytest.raises(ArtifactError, match="HTTP 404"):
            store.fetch(spec_for(f"{base}/missing", b"other"), 5, 10**9)
    finally:
        server.shutdown()


def test_clear_tmp_removes_leftovers(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    (store.tmp / "half-download").write_bytes(b"...")
    assert store.clear_tmp() == 1
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("stall_after", "why"),
    [(None, "a trickle: every read gets a byte well within any socket timeout"),
     (2_000, "some bytes, then silence")],
)
def test_download_has_one_deadline_for_the_whole(tmp_path: Path, stall_after: int | None,
                                                 why: str) -> None:
    body = b"slow-model" * 2_000  # 20 kB at 1 kB every 0.1 s: 2 s
    store = ModelStore(tmp_path / "state")
    with SlowServer(body, chunk=1_000, interval=0.1, stall_after=stall_after) as server:
        spec = spec_for(server.url, body)
        started = time.monotonic()
        with pytest.raises(ArtifactError, match=r"did not finish within deploy.download_timeout_s=0.5s"):
            store.fetch(spec, 0.5, 10**9)
        took = time.monotonic() - started
    assert 0.45 < took < 1.5, why
    assert list(store.tmp.iterdir()) == []
    assert not store.has(spec)


def test_the_deadline_covers_the_response_header(tmp_path: Path) -> None:
    """One header byte every 0.2 s: no read ever waits long, the header never ends."""
    store = ModelStore(tmp_path / "state")
    with SlowServer(b"", chunk=1, interval=1, header_interval=0.2) as server:
        spec = spec_for(server.url, b"never sent")
        started = time.monotonic()
        with pytest.raises(ArtifactError) as info:
            store.fetch(spec, 0.5, 10**9)
        took = time.monotonic() - started
    assert info.value.cause == "deadline"
    assert 0.45 < took < 1.5
    assert list(store.tmp.iterdir()) == []


def test_a_cut_ends_a_download_at_once(tmp_path: Path) -> None:
    """The reconciler cuts a download when a newer manifest supersedes it."""
    store = ModelStore(tmp_path / "state")
    cut = DownloadCut()
    body = b"slow-model" * 2_000
    with SlowServer(body, chunk=10, interval=0.1) as server:
        threading.Timer(0.3, cut.fire, args=("superseded",)).start()
        started = time.monotonic()
        with pytest.raises(ArtifactError) as info:
            store.fetch(spec_for(server.url, body), 30, 10**9, cut=cut)
        took = time.monotonic() - started
    assert info.value.cause == "cut" and cut.cause == "superseded"
    assert took < 1.5
    assert list(store.tmp.iterdir()) == []


def test_download_within_its_deadline_and_checkpoints(tmp_path: Path) -> None:
    body = b"quick" * 2_000
    store = ModelStore(tmp_path / "state")
    reached: list[str] = []
    with SlowServer(body, chunk=5_000, interval=0.05) as server:
        path = store.fetch(spec_for(server.url, body), 5, 10**9, checkpoint=reached.append)
    assert path.read_bytes() == body
    assert reached == ["download", "verify", "install"]


def test_atomic_write_leftovers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "applied.json"
    atomic_write(target, b"old")

    class Killed(BaseException):
        pass

    def die() -> None:
        raise Killed

    # An exception cleans up after itself; a SIGKILL does not, hence remove_stale_temps.
    with pytest.raises(Killed):
        atomic_write(target, b"new", before_replace=die)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["applied.json"]
    (tmp_path / ".applied.json.x1y2.tmp").write_bytes(b"half")
    (tmp_path / ".other.json.x1y2.tmp").write_bytes(b"not ours")
    assert remove_stale_temps(target) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.x1y2.tmp", "applied.json"]
