"""The registry's storage layer: the same tests on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

from edgeinfer.fleet.registry import (
    ModelConflict,
    ModelVersion,
    RegistryError,
    SqlRegistry,
    normalize_ts,
    open_registry,
    parse_selector,
    split_schema,
)
from tests.pgtest import pg_schema_url

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture
def registry(registry_target: str) -> Iterator[SqlRegistry]:
    reg = open_registry(registry_target, max_events=5)
    yield reg
    reg.close()


def _state(reg: SqlRegistry, dev: str, state: str, seen: str | None, **kw: str) -> None:
    reg.record_state(dev, state=state, agent_version=kw.get("version"),
                     session_id=kw.get("session"), started_at=kw.get("started"), seen_at=seen)


def test_devices_state_and_reported(registry: SqlRegistry) -> None:
    assert registry.devices() == []
    assert registry.device("gw-1") is None
    _state(registry, "gw-1", "online", "2026-01-01T00:00:01.000Z", version="0.1.0",
           session="s1", started="2026-01-01T00:00:00.000Z")
    registry.record_reported(
        "gw-1", agent_version=None, revision=3,
        models=[{"name": "digits", "version": "3", "state": "serving"}],
        last_error=None, hardware={"memory_mb": 512, "gpus": []},
        reported_at="2026-01-01T00:00:02.000Z", seen_at="2026-01-01T00:00:02.000Z",
    )
    dev = registry.device("gw-1")
    assert dev is not None
    assert dev.online is True
    assert dev.state == "online"
    assert dev.agent_version == "0.1.0"  # reported without a version keeps the state's
    assert dev.session_id == "s1"
    assert dev.revision == 3
    assert dev.models == [{"name": "digits", "version": "3", "state": "serving"}]
    assert dev.hardware == {"memory_mb": 512, "gpus": []}
    assert dev.last_seen == "2026-01-01T00:00:02.000Z"
    # Offline: the session and version stay; an older timestamp never moves last_seen back.
    _state(registry, "gw-1", "offline", "2025-12-31T00:00:00.000Z")
    dev = registry.device("gw-1")
    assert dev is not None
    assert (dev.online, dev.state, dev.session_id) == (False, "offline", "s1")
    assert dev.last_seen == "2026-01-01T00:00:02.000Z"
    _state(registry, "gw-1", "weird", None)  # neither online nor offline; no time known
    dev = registry.device("gw-1")
    assert dev is not None
    assert dev.online is None
    assert dev.last_seen == "2026-01-01T00:00:02.000Z"
    with pytest.raises(RegistryError, match="device id"):
        _state(registry, "a/b", "online", None)


def test_labels_and_selectors(registry: SqlRegistry) -> None:
    # A device can be labelled before it ever connects.
    assert registry.set_labels("cam-1", {"site": "berlin", "tier": "canary"}) == {
        "site": "berlin", "tier": "canary"}
    assert registry.set_labels("cam-2", {"site": "berlin"}) == {"site": "berlin"}
    assert registry.set_labels("cam-3", {"site": "paris", "gpu": ""}) == {
        "gpu": "", "site": "paris"}
    assert registry.set_labels("cam-1", {"tier": "stable"}, remove=["site"]) == {
        "tier": "stable"}
    assert registry.set_labels("cam-1", {}, remove=["nothing"]) == {"tier": "stable"}

    def ids(selector: str) -> list[str]:
        return [d.device_id for d in registry.devices(parse_selector(selector))]

    assert ids("") == ["cam-1", "cam-2", "cam-3"]
    assert ids("site=berlin") == ["cam-2"]
    assert ids("site!=berlin") == ["cam-1", "cam-3"]
    assert ids("gpu") == ["cam-3"]
    assert ids("!gpu,site") == ["cam-2"]
    dev = registry.device("cam-1")
    assert dev is not None
    assert dev.online is None
    assert dev.labels == {"tier": "stable"}
    with pytest.raises(RegistryError, match="key"):
        registry.set_labels("cam-1", {"a=b": "c"})
    with pytest.raises(RegistryError, match="value"):
        registry.set_labels("cam-1", {"a": "b c"})
    with pytest.raises(RegistryError, match="selector part"):
        parse_selector("site==x")


def test_models_are_immutable(registry: SqlRegistry) -> None:
    mv = ModelVersion("digits", "1", SHA_A, 100, "tensor", "onnx", SHA_B)
    stored, created = registry.add_model(mv)
    assert created
    assert stored.created_at
    again, created = registry.add_model(mv)
    assert not created
    assert again == stored
    with pytest.raises(ModelConflict, match=f"already exists with sha256 {SHA_A}"):
        registry.add_model(ModelVersion("digits", "1", SHA_B, 100))
    registry.add_model(ModelVersion("digits", "2", SHA_B, 7, created_at="2030-01-01T00:00:00.000Z"))
    registry.add_model(ModelVersion("yolo", "8", SHA_B, 7, task="detection"))
    assert [(m.name, m.version) for m in registry.models()] == [
        ("digits", "1"), ("digits", "2"), ("yolo", "8")]
    assert [m.version for m in registry.models("digits")] == ["1", "2"]
    got = registry.model("yolo", "8")
    assert got is not None
    assert got.task == "detection"
    assert registry.model("yolo", "9") is None
    with pytest.raises(RegistryError, match="version"):
        registry.add_model(ModelVersion("digits", "1 2", SHA_A, 1))
    with pytest.raises(RegistryError, match="sha256"):
        registry.add_model(ModelVersion("digits", "3", "xyz", 1))


def test_events_are_bounded(registry: SqlRegistry) -> None:
    for i in range(8):
        registry.add_event("gw-1" if i % 2 else "gw-2",
                           {"ts": f"2026-01-01T00:00:0{i}Z", "type": f"t{i}", "n": i},
                           f"2026-01-01T00:00:0{i}.500Z")
    events = registry.events()
    assert [e.body["n"] for e in events] == [7, 6, 5, 4, 3]  # newest first, 5 kept
    assert events[0].ts == "2026-01-01T00:00:07.000Z"
    assert events[0].type == "t7"
    assert [e.body["n"] for e in registry.events("gw-1")] == [7, 5, 3]
    assert [e.body["n"] for e in registry.events(type_="t4")] == [4]
    assert [e.body["n"] for e in registry.events(limit=2)] == [7, 6]
    # Events count as hearing from the device.
    dev = registry.device("gw-1")
    assert dev is not None
    assert dev.last_seen == "2026-01-01T00:00:07.500Z"


def test_telemetry_last_per_device(registry: SqlRegistry) -> None:
    assert registry.telemetry("gw-1") is None
    registry.record_telemetry("gw-1", {"queue_depth": 1}, "2026-01-01T00:00:00.000Z")
    registry.record_telemetry("gw-1", {"queue_depth": 2}, "2026-01-01T00:00:01.000Z")
    t = registry.telemetry("gw-1")
    assert t is not None
    assert t.body == {"queue_depth": 2}
    assert t.received_at == "2026-01-01T00:00:01.000Z"
    dev = registry.device("gw-1")
    assert dev is not None
    assert dev.last_seen == "2026-01-01T00:00:01.000Z"


def test_reopen_keeps_everything(registry_target: str) -> None:
    reg = open_registry(registry_target)
    reg.set_labels("gw-1", {"site": "x"})
    reg.add_model(ModelVersion("m", "1", SHA_A, 1))
    reg.add_event("gw-1", {"type": "deploy_started"}, "2026-01-01T00:00:00.000Z")
    reg.close()
    reg = open_registry(registry_target)
    try:
        dev = reg.device("gw-1")
        assert dev is not None
        assert dev.labels == {"site": "x"}
        assert [m.name for m in reg.models()] == ["m"]
        assert [e.type for e in reg.events()] == ["deploy_started"]
    finally:
        reg.close()


def test_concurrent_writers(registry: SqlRegistry) -> None:
    def work(n: int) -> None:
        for i in range(20):
            registry.record_telemetry(f"gw-{n}", {"i": i}, f"2026-01-01T00:00:{i:02d}.000Z")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [d.device_id for d in registry.devices()] == ["gw-0", "gw-1", "gw-2", "gw-3"]


def test_helpers() -> None:
    assert normalize_ts("2026-01-01T00:00:00Z") == "2026-01-01T00:00:00.000Z"
    assert normalize_ts("2026-01-01T02:00:00+02:00") == "2026-01-01T00:00:00.000Z"
    assert normalize_ts("yesterday") is None
    assert normalize_ts(5) is None
    assert split_schema("postgresql://h/db?schema=s&sslmode=disable") == (
        "postgresql://h/db?sslmode=disable", "s")
    assert split_schema("postgresql://h/db") == ("postgresql://h/db", None)
    with pytest.raises(RegistryError, match="schema"):
        open_registry("postgresql://127.0.0.1:1/test?schema=bad-name")


def test_postgres_reconnects_after_the_server_drops_it() -> None:
    import psycopg

    from edgeinfer.fleet.registry import PostgresRegistry, RegistryUnavailable

    with pg_schema_url() as url:
        reg = open_registry(url)
        assert isinstance(reg, PostgresRegistry)
        try:
            reg.set_labels("gw-1", {"a": "b"})
            pid = reg._db.info.backend_pid
            with psycopg.connect(url.split("?")[0], autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            # The first use finds the connection dead (retryable); the next reconnects.
            with contextlib.suppress(RegistryUnavailable):
                reg.devices()
            assert [d.labels for d in reg.devices()] == [{"a": "b"}]
        finally:
            reg.close()
