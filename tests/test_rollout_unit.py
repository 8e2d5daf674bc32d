"""The rollout engine without a broker: specs, the health gate, failures, leases, joiners.

A real registry (SQLite) and a dict standing in for the retained `desired` topics; the
devices' `reported` and `telemetry` are written into the registry as the controller would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from edgeinfer.contract.manifest import Manifest
from edgeinfer.fleet.registry import SqlRegistry, open_registry, utc_now
from edgeinfer.fleet.rollout import (
    Amount,
    Rollout,
    RolloutEngine,
    RolloutError,
    RolloutStore,
    parse_health,
    parse_waves,
)

SHA1, SHA2 = "1" * 64, "2" * 64


def spec(version: str, sha: str) -> dict[str, Any]:
    return {"name": "m", "version": version, "uri": f"file:///a/{sha}", "sha256": sha,
            "size": 10}


class FakeDesired:
    def __init__(self) -> None:
        self.manifests: dict[str, Manifest] = {}

    def read(self, device_id: str) -> tuple[Manifest | None, int | None]:
        return self.manifests.get(device_id), None

    def publish(self, device_id: str, manifest: Manifest) -> None:
        self.manifests[device_id] = manifest

    def version(self, device_id: str) -> str | None:
        m = self.manifests.get(device_id)
        return next((s.version for s in m.models if s.name == "m"), None) if m else None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reg(registry_target: str) -> Iterator[SqlRegistry]:
    r = open_registry(registry_target)
    yield r
    r.close()


def online(reg: SqlRegistry, *devices: str, group: str = "ro") -> None:
    for d in devices:
        reg.set_labels(d, {"g": group})
        reg.record_state(d, state="online", agent_version="1", session_id="s",
                         started_at=None, seen_at=utc_now())


def report(reg: SqlRegistry, device: str, version: str, state: str, sha: str = SHA2,
           error: str | None = None) -> None:
    reg.record_reported(device, agent_version="1", revision=None,
                        models=[{"name": "m", "version": version, "sha256": sha, "state": state,
                                 "error": error}],
                        last_error=None, hardware={}, reported_at=utc_now(), seen_at=None)


def telemetry(reg: SqlRegistry, device: str, ok: int, errors: int, p95: float) -> None:
    reg.record_telemetry(device, {"inference": {"models": {"m:2": {
        "ok": ok, "errors": {"INTERNAL": errors} if errors else {},
        "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95}}}}}, utc_now())


def start(store: RolloutStore, **kw: Any) -> Rollout:
    fields: dict[str, Any] = {
        "id": 0, "model": "m", "version": "2", "sha256": SHA2, "spec": spec("2", SHA2),
        "selector": "g=ro", "waves": ["1", "100%"], "max_failures": "0", "health": "",
        "bake_s": 5.0, "install_timeout_s": 30.0, **kw}
    return store.create(Rollout(**fields))


def setup(reg: SqlRegistry, *devices: str) -> tuple[RolloutStore, FakeDesired, Clock,
                                                      RolloutEngine]:
    online(reg, *devices)
    desired, clock = FakeDesired(), Clock()
    for d in devices:
        desired.publish(d, msgspec.convert({"revision": 1, "models": [spec("1", SHA1)]},
                                           Manifest))
    store = RolloutStore(reg)
    return store, desired, clock, RolloutEngine(store, desired, driver="t", clock=clock)


def test_specs() -> None:
    assert parse_waves("1,10%,50%") == [Amount(1, False), Amount(10, True), Amount(50, True),
                                         Amount(100, True)]
    assert [w.of(7) for w in parse_waves("1,10%,50%,100%")] == [1, 1, 4, 7]
    for bad in ("", "0,100%", "x", "150%", "-1"):
        with pytest.raises(RolloutError):
            parse_waves(bad)
    rules = parse_health("error_rate<1%, p95_ms<=50")
    assert [str(r) for r in rules] == ["error_rate<1%", "p95_ms<=50"]
    assert rules[0].limit == pytest.approx(0.01)
    assert rules[1].holds(50) and not rules[1].holds(50.1)
    for bad in ("latency<5", "p95_ms<5%", "error_rate>1%"):
        with pytest.raises(RolloutError):
            parse_health(bad)


def test_waves_bake_and_health_gate(reg: SqlRegistry) -> None:
    store, desired, clock, engine = setup(reg, "a", "b", "c")
    r = start(store, health="error_rate<10%,p95_ms<50")
    engine.step()
    assert [d.device_id for d in store.devices(r.id)] == ["a"]
    assert desired.version("a") == "2" and desired.version("b") == "1"
    report(reg, "a", "2", "serving")
    engine.step()
    r2 = store.get(r.id)
    assert r2 is not None and (r2.phase, r2.bake_until) == ("baking", 1005.0)
    telemetry(reg, "a", ok=100, errors=5, p95=20)  # 4.8% errors, fast: healthy
    clock.now = 1006
    engine.step()
    r2 = store.get(r.id)
    assert r2 is not None and (r2.wave, r2.phase) == (1, "deploying")
    engine.step()
    assert {d.device_id for d in store.devices(r.id)} == {"a", "b", "c"}
    report(reg, "b", "2", "serving")
    report(reg, "c", "2", "serving")
    engine.step()
    telemetry(reg, "c", ok=10, errors=0, p95=80)  # the worst device decides p95
    engine.step()
    r2 = store.get(r.id)
    assert r2 is not None and r2.status == "rolled_back"
    assert "p95_ms 80 (c) breaks p95_ms<50" in (r2.reason or "")
    assert [desired.version(d) for d in "abc"] == ["1", "1", "1"]
    assert all(d.reverted for d in store.devices(r.id))


def test_failures_halt_past_the_limit_and_timeouts_count(reg: SqlRegistry) -> None:
    store, desired, clock, engine = setup(reg, "a", "b", "c", "d")
    r = start(store, waves=["2", "100%"], max_failures="25%", bake_s=0.0)  # 1 of 4 tolerated
    engine.step()
    assert [d.device_id for d in store.devices(r.id)] == ["a", "b"]
    report(reg, "a", "2", "failed", error="load failed")
    report(reg, "b", "2", "serving")
    engine.step()
    engine.step()  # bake of 0 s: on to wave 2
    assert {d.device_id for d in store.devices(r.id)} == {"a", "b", "c", "d"}
    report(reg, "c", "2", "serving")
    clock.now += 31  # d never answers
    engine.step()
    r2 = store.get(r.id)
    assert r2 is not None and r2.status == "halted"
    assert "2 install failures" in (r2.reason or "") and "not serving after 30s" in (r2.reason or "")
    assert [desired.version(d) for d in "abcd"] == ["1", "1", "1", "1"]


def test_lease_pause_abort_and_late_joiner(reg: SqlRegistry) -> None:
    store, desired, clock, engine = setup(reg, "a")
    other = RolloutEngine(store, desired, driver="other", clock=clock)
    r = start(store, waves=["100%"], bake_s=0.0)
    engine.step()
    other.step()  # the lease is engine's: other does nothing
    assert len(store.devices(r.id)) == 1
    report(reg, "a", "2", "serving")
    engine.step()
    engine.step()
    r2 = store.get(r.id)
    assert r2 is not None and r2.status == "completed"
    # A new device in the group gets the version; one that serves it already is recorded.
    online(reg, "b", "c")
    report(reg, "c", "2", "serving")
    engine.step()
    states = {d.device_id: d.state for d in store.devices(r.id)}
    assert states == {"a": "serving", "b": "pending", "c": "serving"}
    assert desired.version("b") == "2" and "c" not in desired.manifests
    # A second rollout of the same model takes over the group; pause and abort it.
    r3 = start(store, version="3", sha256="3" * 64, spec=spec("3", "3" * 64), waves=["100%"])
    store.control(r3.id, "pause")
    engine.step()
    assert store.devices(r3.id) == []
    with pytest.raises(RolloutError):
        store.control(r3.id, "pause")
    store.control(r3.id, "resume")
    engine.step()
    assert len(store.devices(r3.id)) == 3
    store.control(r3.id, "abort")
    engine.step()
    r4 = store.get(r3.id)
    assert r4 is not None and r4.status == "aborted"
    assert desired.version("a") == "2" and desired.version("b") == "2"
    assert desired.version("c") is None  # it had no desired `m` before: removed again
    with pytest.raises(RolloutError):
        store.control(r3.id, "resume")
