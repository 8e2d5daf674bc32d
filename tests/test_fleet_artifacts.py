"""The content-addressed artifact store and its HTTP server."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeinfer.fleet.artifacts import ArtifactServer, ArtifactStore, artifact_url, serve_artifacts
from tests.helpers import http_request


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    f = tmp_path / "model.onnx"
    f.write_bytes(b"onnx-bytes" * 1000)
    return f


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def server(store: ArtifactStore) -> Iterator[ArtifactServer]:
    s = serve_artifacts(store.root, "127.0.0.1", 0)
    yield s
    s.shutdown()


def test_put_file_is_content_addressed(store: ArtifactStore, model_file: Path) -> None:
    data = model_file.read_bytes()
    a = store.put_file(model_file)
    assert a.sha256 == hashlib.sha256(data).hexdigest()
    assert a.size == len(data)
    assert a.path == store.root / "sha256" / a.sha256
    assert a.path.read_bytes() == data
    # Readable by an agent running as another user.
    assert stat.S_IMODE(a.path.stat().st_mode) == 0o644
    again = store.put_file(model_file)
    assert again == a
    assert [p.name for p in (store.root / "sha256").iterdir()] == [a.sha256]  # no temp left
    assert store.get(a.sha256) == a
    assert store.get("0" * 64) is None
    with pytest.raises(ValueError, match="sha256"):
        store.path_for("../etc/passwd")


def test_put_missing_file_leaves_nothing(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file(tmp_path / "nope.onnx")
    assert list((store.root / "sha256").iterdir()) == []


def test_get_and_head(server: ArtifactServer, store: ArtifactStore, model_file: Path) -> None:
    a = store.put_file(model_file)
    url = artifact_url(server.url, a.sha256)
    assert url == f"{server.url}/artifacts/sha256/{a.sha256}"
    path = f"/artifacts/sha256/{a.sha256}"
    status, headers, body = http_request(server, path)
    assert status == 200
    assert body == model_file.read_bytes()
    assert headers["Content-Length"] == str(a.size)
    assert headers["ETag"] == f'"{a.sha256}"'
    assert headers["Content-Type"] == "application/octet-stream"
    status, headers, body = http_request(server, path, method="HEAD")
    assert status == 200
    assert body == b""
    assert headers["Content-Length"] == str(a.size)
    status, _, body = http_request(server, path, {"If-None-Match": f'"{a.sha256}"'})
    assert status == 304
    assert body == b""


@pytest.mark.parametrize("path", [
    "/artifacts/sha256/" + "0" * 64,  # well-formed, not stored
    "/artifacts/sha256/",
    "/artifacts/sha256/ABC",
    "/",
    "/sha256",
    "/../../etc/passwd",
    "/artifacts/sha256/../../../etc/passwd",
    "/artifacts/sha256/..%2f..%2f..%2fetc%2fpasswd",
    "/artifacts/sha256/%2e%2e/model.onnx",
])
def test_everything_else_is_404(server: ArtifactServer, store: ArtifactStore,
                                model_file: Path, path: str) -> None:
    store.put_file(model_file)
    status, _, _ = http_request(server, path)
    assert status == 404
    status, _, _ = http_request(server, path, method="HEAD")
    assert status == 404


def test_stored_path_with_suffix_is_404(server: ArtifactServer, store: ArtifactStore,
                                        model_file: Path) -> None:
    a = store.put_file(model_file)
    for path in (f"/artifacts/sha256/{a.sha256}/", f"/artifacts/sha256/{a.sha256}/../x"):
        assert http_request(server, path)[0] == 404
    # A query string does not change what is served.
    assert http_request(server, f"/artifacts/sha256/{a.sha256}?x=1")[0] == 200


def test_other_methods_refused(server: ArtifactServer) -> None:
    status, _, _ = http_request(server, "/artifacts/sha256/" + "0" * 64, method="PUT")
    assert status == 501


def test_shutdown_releases_the_port(store: ArtifactStore) -> None:
    s = serve_artifacts(store.root, "127.0.0.1", 0)
    port = s.server_address[1]
    s.shutdown()
    again = serve_artifacts(store.root, "127.0.0.1", port)
    again.shutdown()
