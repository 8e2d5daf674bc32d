"""The controller's HTTP side: artifacts with ETag and Range, and the JSON API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeinfer.fleet.artifacts import ArtifactStore, parse_range
from edgeinfer.fleet.http_api import Api, ControllerServer
from edgeinfer.fleet.registry import ModelVersion, SqlRegistry, open_registry
from tests.helpers import http_request

DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SqlRegistry]:
    reg = open_registry(tmp_path / "registry.sqlite3")
    yield reg
    reg.close()


@pytest.fixture
def server(tmp_path: Path, registry: SqlRegistry) -> Iterator[ControllerServer]:
    store = ArtifactStore(tmp_path / "artifacts")
    s = ControllerServer(store, Api(registry, lambda: {"connected": True}), "127.0.0.1", 0)
    s.start()
    yield s
    s.shutdown()


@pytest.fixture
def sha(server: ControllerServer, tmp_path: Path) -> str:
    f = tmp_path / "model.onnx"
    f.write_bytes(DATA)
    return server.store.put_file(f).sha256


def _json(server: ControllerServer, path: str) -> tuple[int, Any]:
    status, headers, body = http_request(server, path)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def test_etag(server: ControllerServer, sha: str) -> None:
    path = f"/artifacts/sha256/{sha}"
    status, headers, body = http_request(server, path)
    assert (status, body) == (200, DATA)
    assert headers["ETag"] == f'"{sha}"'
    assert headers["Accept-Ranges"] == "bytes"
    for inm in (f'"{sha}"', f'"other", "{sha}"', "*", f'W/"{sha}"'):
        status, headers, body = http_request(server, path, {"If-None-Match": inm})
        assert (status, body) == (304, b""), inm
        assert headers["ETag"] == f'"{sha}"'
    assert http_request(server, path, {"If-None-Match": '"other"'})[0] == 200


@pytest.mark.parametrize(("spec", "start", "end"), [
    ("bytes=0-99", 0, 99),
    ("bytes=10000-", 10000, 10239),
    ("bytes=-40", 10200, 10239),
    ("bytes=10200-99999", 10200, 10239),  # the end is clamped to the file
    ("bytes=-99999", 0, 10239),
    ("bytes=5-5", 5, 5),
])
def test_range(server: ControllerServer, sha: str, spec: str, start: int, end: int) -> None:
    status, headers, body = http_request(server, f"/artifacts/sha256/{sha}", {"Range": spec})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert headers["Content-Length"] == str(end - start + 1)
    assert body == DATA[start:end + 1]
    status, headers, body = http_request(server, f"/artifacts/sha256/{sha}", {"Range": spec}, "HEAD")
    assert (status, body) == (206, b"")
    assert headers["Content-Length"] == str(end - start + 1)


@pytest.mark.parametrize("spec", ["bytes=10240-", "bytes=99999-100000", "bytes=5-2",
                                  "bytes=-0", "bytes=abc", "bytes=-", "bytes=1-2-3"])
def test_range_not_satisfiable(server: ControllerServer, sha: str, spec: str) -> None:
    status, headers, body = http_request(server, f"/artifacts/sha256/{sha}", {"Range": spec})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert body == b""


@pytest.mark.parametrize("headers", [
    {"Range": "items=0-5"},  # another unit
    {"Range": "bytes=0-1,5-6"},  # several ranges: the whole file instead
    {"Range": "bytes=0-1", "If-Range": '"not-this"'},  # resume of other content
])
def test_range_ignored(server: ControllerServer, sha: str, headers: dict[str, str]) -> None:
    status, _, body = http_request(server, f"/artifacts/sha256/{sha}", headers)
    assert (status, body) == (200, DATA)


def test_if_range_matching(server: ControllerServer, sha: str) -> None:
    status, _, body = http_request(server, f"/artifacts/sha256/{sha}",
                           {"Range": "bytes=1-2", "If-Range": f'"{sha}"'})
    assert (status, body) == (206, DATA[1:3])


def test_parse_range_empty_file() -> None:
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=-5", 0) == "unsatisfiable"
    assert parse_range("bytes = 0-1", 10) == (0, 2)


def test_api(server: ControllerServer, registry: SqlRegistry) -> None:
    registry.record_state("gw-1", state="online", agent_version="0.1.0", session_id="s1",
                          started_at=None, seen_at="2026-01-01T00:00:00.000Z")
    registry.set_labels("gw-1", {"site": "berlin"})
    registry.set_labels("gw-2", {"site": "paris"})
    registry.record_telemetry("gw-1", {"queue_depth": 3}, "2026-01-01T00:00:01.000Z")
    registry.add_model(ModelVersion("digits", "1", "a" * 64, 10))
    for i in range(3):
        registry.add_event("gw-1", {"type": f"t{i}"}, f"2026-01-01T00:00:0{i}.000Z")

    status, doc = _json(server, "/api/devices")
    assert status == 200
    assert [d["device_id"] for d in doc["devices"]] == ["gw-1", "gw-2"]
    assert doc["devices"][0]["online"] is True
    assert doc["devices"][0]["labels"] == {"site": "berlin"}
    status, doc = _json(server, "/api/devices?selector=site%3Dparis")
    assert [d["device_id"] for d in doc["devices"]] == ["gw-2"]
    status, doc = _json(server, "/api/devices/gw-1")
    assert status == 200
    assert doc["telemetry"]["body"] == {"queue_depth": 3}
    status, doc = _json(server, "/api/devices/gw-2")
    assert doc["telemetry"] is None
    status, doc = _json(server, "/api/models")
    assert doc["models"][0]["name"] == "digits"
    assert doc["models"][0]["sha256"] == "a" * 64
    assert _json(server, "/api/models?name=nope")[1] == {"models": []}
    status, doc = _json(server, "/api/events?limit=2")
    assert [e["type"] for e in doc["events"]] == ["t2", "t1"]
    status, doc = _json(server, "/api/events?device=gw-2")
    assert doc["events"] == []
    assert _json(server, "/api/status") == (200, {"connected": True})


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/api/devices/nobody", 404, "no device nobody"),
    ("/api/nothing", 404, "no such API path"),
    ("/api/devices/a%2Fb", 404, "no such API path"),
    ("/api/events?limit=x", 400, "not a number"),
    ("/api/events?limit=0", 400, "limit must be"),
    ("/api/devices?selector=a==b", 400, "selector part"),
])
def test_api_errors(server: ControllerServer, path: str, status: int, message: str) -> None:
    got, doc = _json(server, path)
    assert got == status
    assert message in doc["error"]


def test_artifact_404_still_html_free_of_api(server: ControllerServer) -> None:
    assert http_request(server, "/artifacts/sha256/" + "0" * 64)[0] == 404
    assert http_request(server, "/api")[0] == 404
