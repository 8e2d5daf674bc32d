"""Rollouts: a model version to a group of devices, wave by wave, with health gates.

    edge-fleet rollout start digits:4 --group site=berlin --waves 1,10%,50%,100% \\
        --max-failures 5% --health "error_rate<1%,p95_ms<50" --bake 60s

A rollout is a row in the registry (tables `rollouts` and `rollout_devices`, created
next to the registry's own); the engine (`RolloutEngine.step`) moves every rollout it
drives one step on, reading what the controller ingested (`reported`, `telemetry`) from
the same registry and publishing desired manifests over MQTT. All progress is written
back after each step, so whoever drives next (the controller after a restart, or
`rollout start --drive`) picks up where the last one stopped. A lease (`driver`,
`lease_until`) makes sure one engine drives a rollout at a time.

One wave: publish the next manifests (the group's online devices not yet touched, in
device-id order, up to the wave's cumulative target), wait until each device serves the
version or fails (`failed` in `reported`, the manifest refused, or no answer within the
install timeout), halt when failures exceed `--max-failures` (every touched device goes
back to its previous version), then bake: watch the telemetry of every device serving
the new version for the bake time; a broken health gate rolls every touched device back.
A completed rollout keeps the group on its version: a device that joins the group later
(online, labels matching) gets it too.
"""

# S608: queries are built only from this module's constant column lists; values are parameters.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from edgeinfer.contract.manifest import Manifest, ModelSpec
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.deploy import DeployError, next_manifest, publish_desired, read_current
from edgeinfer.fleet.mqtt import BrokerError, Connection
from edgeinfer.fleet.registry import (
    Device,
    RegistryError,
    RegistryUnavailable,
    SqlRegistry,
    parse_selector,
    utc_now,
)
from edgeinfer.fleet.reports import find_model
from edgeinfer.fleet.signing import Signer

log = logging.getLogger(__name__)

# Rollout statuses. `aborting` is a request (from `rollout abort`) the engine carries out.
RUNNING, PAUSED, ABORTING = "running", "paused", "aborting"
COMPLETED, HALTED, ROLLED_BACK, ABORTED = "completed", "halted", "rolled_back", "aborted"
TERMINAL = frozenset({COMPLETED, HALTED, ROLLED_BACK, ABORTED})
# Wave phases.
DEPLOYING, BAKING = "deploying", "baking"
# Device states within a rollout.
PENDING, SERVING, FAILED = "pending", "serving", "failed"

DEFAULT_INSTALL_TIMEOUT_S = 300.0
DEFAULT_LEASE_S = 15.0


class RolloutError(Exception):
    """A rollout that cannot be started or changed; the message says why."""


# -- parsing the command line's specs -------------------------------------------------------


@dataclass(frozen=True)
class Amount:
    """A number of devices, absolute (`3`) or a share of the group (`10%`)."""

    value: float
    percent: bool

    def of(self, group_size: int) -> int:
        if not self.percent:
            return int(self.value)
        return math.ceil(self.value * group_size / 100 - 1e-9)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


def parse_amount(text: str, what: str) -> Amount:
    raw = text.strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1])
            if not 0 <= value <= 100:
                raise ValueError
            return Amount(value, True)
        number = int(raw)
        if number < 0:
            raise ValueError
        return Amount(number, False)
    except ValueError:
        raise RolloutError(f"{what} {text!r}: say a count (3) or a percentage (10%)") from None


def parse_waves(text: str) -> list[Amount]:
    """`1,10%,50%,100%`: cumulative targets; the last must cover the whole group."""
    waves = [parse_amount(p, "wave") for p in text.split(",") if p.strip()]
    if not waves:
        raise RolloutError("--waves needs at least one wave, e.g. 1,10%,50%,100%")
    if any(w.value <= 0 for w in waves):
        raise RolloutError(f"--waves {text!r}: every wave must add devices (no 0 or 0%)")
    last = waves[-1]
    if not (last.percent and last.value == 100):
        waves.append(Amount(100, True))
    return waves


# Health metrics: the error share over every job since each device began serving the
# version (all touched devices together), and the worst device's latency percentile.
_METRICS = {"error_rate", "p50_ms", "p95_ms", "p99_ms"}
_RULE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|<)\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class Rule:
    metric: str
    op: str
    limit: float  # error_rate as a fraction (1% -> 0.01); latencies in ms

    def holds(self, measured: float) -> bool:
        return measured < self.limit if self.op == "<" else measured <= self.limit

    def __str__(self) -> str:
        if self.metric == "error_rate":
            return f"{self.metric}{self.op}{self.limit * 100:g}%"
        return f"{self.metric}{self.op}{self.limit:g}"


def parse_health(text: str) -> list[Rule]:
    """`error_rate<1%,p95_ms<50`: every rule must hold during the bake."""
    rules = []
    for part in (p for p in text.split(",") if p.strip()):
        m = _RULE_RE.match(part)
        if not m or m.group(1) not in _METRICS:
            raise RolloutError(
                f"--health part {part!r}: say METRIC<VALUE with METRIC one of "
                f"{', '.join(sorted(_METRICS))}, e.g. error_rate<1%,p95_ms<50")
        metric, op, value, pct = m.groups()
        limit = float(value)
        if metric == "error_rate":
            limit = limit / 100 if pct else limit
        elif pct:
            raise RolloutError(f"--health part {part!r}: {metric} is in milliseconds, not %")
        rules.append(Rule(metric, op, limit))
    return rules


# -- records --------------------------------------------------------------------------------


@dataclass
class Rollout:
    id: int
    model: str
    version: str
    sha256: str
    spec: dict[str, Any]  # the manifest entry every device gets
    selector: str
    waves: list[str]
    max_failures: str
    health: str
    bake_s: float
    install_timeout_s: float
    status: str = RUNNING
    wave: int = 0  # index into waves
    phase: str = DEPLOYING
    bake_until: float | None = None
    reason: str | None = None
    created_at: str = ""
    updated_at: str = ""
    driver: str | None = None
    lease_until: float | None = None

    @property
    def target(self) -> str:
        return f"{self.model}:{self.version}"

    def wave_amounts(self) -> list[Amount]:
        return [parse_amount(w, "wave") for w in self.waves]

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class RolloutDevice:
    rollout_id: int
    device_id: str
    wave: int
    state: str = PENDING
    revision: int | None = None
    published_at: float = 0.0
    deadline: float = 0.0
    reported_before: str | None = None  # the device's reported_at when we published
    prev_spec: dict[str, Any] | None = None  # what it had before (None: no such model)
    base_ok: int = 0  # telemetry counters when it began serving the version
    base_errors: int = 0
    error: str | None = None
    reverted: bool = False
    updated_at: str = ""

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_TABLES = """
CREATE TABLE IF NOT EXISTS rollouts (
    id BIGINT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    spec TEXT NOT NULL,
    selector TEXT NOT NULL,
    waves TEXT NOT NULL,
    max_failures TEXT NOT NULL,
    health TEXT NOT NULL,
    bake_s DOUBLE PRECISION NOT NULL,
    install_timeout_s DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    wave INTEGER NOT NULL,
    phase TEXT NOT NULL,
    bake_until DOUBLE PRECISION,
    reason TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    driver TEXT,
    lease_until DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,
    revision BIGINT,
    published_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    reported_before TEXT,
    prev_spec TEXT,
    base_ok BIGINT NOT NULL,
    base_errors BIGINT NOT NULL,
    error TEXT,
    reverted INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
)
"""

_R_COLS = ("id, model, version, sha256, spec, selector, waves, max_failures, health, bake_s, "
           "install_timeout_s, status, wave, phase, bake_until, reason, created_at, updated_at, "
           "driver, lease_until")
_D_COLS = ("rollout_id, device_id, wave, state, revision, published_at, deadline, "
           "reported_before, prev_spec, base_ok, base_errors, error, reverted, updated_at")
# What a step may change on a rollout (the rest is fixed at start).
_R_MUTABLE = ("status", "wave", "phase", "bake_until", "reason")


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _rollout(r: Any) -> Rollout:
    return Rollout(
        id=int(r[0]), model=str(r[1]), version=str(r[2]), sha256=str(r[3]),
        spec=json.loads(r[4]), selector=str(r[5]), waves=json.loads(r[6]),
        max_failures=str(r[7]), health=str(r[8]), bake_s=float(r[9]),
        install_timeout_s=float(r[10]), status=str(r[11]), wave=int(r[12]), phase=str(r[13]),
        bake_until=None if r[14] is None else float(r[14]), reason=r[15],
        created_at=str(r[16]), updated_at=str(r[17]), driver=r[18],
        lease_until=None if r[19] is None else float(r[19]))


def _device(r: Any) -> RolloutDevice:
    return RolloutDevice(
        rollout_id=int(r[0]), device_id=str(r[1]), wave=int(r[2]), state=str(r[3]),
        revision=None if r[4] is None else int(r[4]), published_at=float(r[5]),
        deadline=float(r[6]), reported_before=r[7],
        prev_spec=None if r[8] is None else json.loads(r[8]), base_ok=int(r[9]),
        base_errors=int(r[10]), error=r[11], reverted=bool(r[12]), updated_at=str(r[13]))


class RolloutStore:
    """The rollout tables, inside the registry's database (SQLite or PostgreSQL).

    Uses the registry's own connection and transactions, so the CLI and the controller
    share rollouts exactly as they share devices.
    """

    def __init__(self, registry: SqlRegistry) -> None:
        self.registry = registry

        def create(ex: Any) -> None:
            for stmt in _TABLES.split(";"):
                if stmt.strip():
                    ex(stmt)
        registry._run(create)

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        return self.registry._run(fn)

    def create(self, r: Rollout) -> Rollout:
        now = utc_now()

        def write(ex: Any) -> int:
            new_id = int(ex("SELECT COALESCE(MAX(id), 0) + 1 FROM rollouts")[0][0])
            ex(f"INSERT INTO rollouts ({_R_COLS}) VALUES "
               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               [new_id, r.model, r.version, r.sha256, _dumps(r.spec), r.selector,
                _dumps(r.waves), r.max_failures, r.health, r.bake_s, r.install_timeout_s,
                r.status, r.wave, r.phase, r.bake_until, r.reason, now, now, None, None])
            return new_id
        created = self.get(int(self._run(write)))
        assert created is not None
        return created

    def get(self, rollout_id: int) -> Rollout | None:
        rows = self._run(lambda ex: ex(f"SELECT {_R_COLS} FROM rollouts WHERE id = ?",
                                       [rollout_id]))
        return _rollout(rows[0]) if rows else None

    def all(self, statuses: Iterable[str] | None = None) -> list[Rollout]:
        rows = self._run(lambda ex: ex(f"SELECT {_R_COLS} FROM rollouts ORDER BY id"))
        found = [_rollout(r) for r in rows]
        if statuses is not None:
            wanted = set(statuses)
            found = [r for r in found if r.status in wanted]
        return found

    def save(self, r: Rollout) -> None:
        """Write the fields a step changes."""
        sets = ", ".join(f"{c} = ?" for c in _R_MUTABLE)
        self._run(lambda ex: ex(
            f"UPDATE rollouts SET {sets}, updated_at = ? WHERE id = ?",
            [*(getattr(r, c) for c in _R_MUTABLE), utc_now(), r.id]))

    def claim(self, rollout_id: int, driver: str, now: float, lease_s: float) -> bool:
        """Take (or renew) the right to drive a rollout; False while another holds it."""
        rows = self._run(lambda ex: ex(
            "UPDATE rollouts SET driver = ?, lease_until = ? WHERE id = ? AND "
            "(driver IS NULL OR driver = ? OR lease_until IS NULL OR lease_until < ?) "
            "RETURNING id", [driver, now + lease_s, rollout_id, driver, now]))
        return bool(rows)

    def release(self, rollout_id: int, driver: str) -> None:
        self._run(lambda ex: ex(
            "UPDATE rollouts SET driver = NULL, lease_until = NULL WHERE id = ? AND driver = ?",
            [rollout_id, driver]))

    def control(self, rollout_id: int, action: str, now: float | None = None) -> Rollout:
        """`pause`, `resume` or `abort`, as the CLI asks; raises RolloutError when it cannot."""
        current = self.get(rollout_id)
        if current is None:
            raise RolloutError(f"no rollout {rollout_id}")
        allowed = {"pause": {RUNNING}, "resume": {PAUSED}, "abort": {RUNNING, PAUSED}}[action]
        if current.status not in allowed:
            raise RolloutError(f"rollout {rollout_id} is {current.status}: cannot {action} it")
        new_status = {"pause": PAUSED, "resume": RUNNING, "abort": ABORTING}[action]
        moment = time.time() if now is None else now

        def write(ex: Any) -> list[Any]:
            if action == "resume":
                # The bake starts over: what was watched before the pause is not enough.
                return list(ex(
                    "UPDATE rollouts SET status = ?, bake_until = CASE WHEN phase = ? "
                    "THEN ? + bake_s ELSE bake_until END, updated_at = ? "
                    "WHERE id = ? AND status IN (?) RETURNING id",
                    [new_status, BAKING, moment, utc_now(), rollout_id, PAUSED]))
            marks = ", ".join("?" for _ in allowed)
            return list(ex(
                f"UPDATE rollouts SET status = ?, updated_at = ? WHERE id = ? "
                f"AND status IN ({marks}) RETURNING id",
                [new_status, utc_now(), rollout_id, *sorted(allowed)]))
        if not self._run(write):
            raise RolloutError(f"rollout {rollout_id} changed meanwhile: try again")
        changed = self.get(rollout_id)
        assert changed is not None
        return changed

    def devices(self, rollout_id: int) -> list[RolloutDevice]:
        rows = self._run(lambda ex: ex(
            f"SELECT {_D_COLS} FROM rollout_devices WHERE rollout_id = ? ORDER BY wave, device_id",
            [rollout_id]))
        return [_device(r) for r in rows]

    def put_device(self, d: RolloutDevice) -> None:
        values = [d.rollout_id, d.device_id, d.wave, d.state, d.revision, d.published_at,
                  d.deadline, d.reported_before,
                  None if d.prev_spec is None else _dumps(d.prev_spec), d.base_ok,
                  d.base_errors, d.error, int(d.reverted), utc_now()]
        updates = ", ".join(f"{c.strip()} = excluded.{c.strip()}" for c in _D_COLS.split(",")[2:])
        self._run(lambda ex: ex(
            f"INSERT INTO rollout_devices ({_D_COLS}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (rollout_id, device_id) DO UPDATE SET {updates}", values))


# -- desired manifests over MQTT ------------------------------------------------------------


class DesiredIO(Protocol):
    """How the engine reads and writes a device's desired manifest."""

    def read(self, device_id: str) -> tuple[Manifest | None, int | None]: ...

    def publish(self, device_id: str, manifest: Manifest) -> None: ...


class MqttDesired:
    """Retained `desired` over one MQTT connection, signed when a signer is given."""

    def __init__(self, conn: Connection, prefix: str, signer: Signer | None = None) -> None:
        self.conn = conn
        self.prefix = prefix
        self.signer = signer

    def read(self, device_id: str) -> tuple[Manifest | None, int | None]:
        return read_current(self.conn, Topics(self.prefix, device_id))

    def publish(self, device_id: str, manifest: Manifest) -> None:
        publish_desired(self.conn, Topics(self.prefix, device_id), manifest, signer=self.signer)


# -- the engine -----------------------------------------------------------------------------


def _count(value: Any) -> int:
    """`ok` is a number; `errors` is a number or (what agents send) a count per code."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    return 0


@dataclass(frozen=True)
class ModelStats:
    ok: int
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)


def model_stats(telemetry: dict[str, Any] | None, key: str) -> ModelStats | None:
    """`inference.models[key]` of a telemetry document, tolerating any shape."""
    if not isinstance(telemetry, dict):
        return None
    inference = telemetry.get("inference")
    models = inference.get("models") if isinstance(inference, dict) else None
    entry = models.get(key) if isinstance(models, dict) else None
    if not isinstance(entry, dict):
        return None
    lat = entry.get("latency_ms")
    latency = {k: float(v) for k, v in lat.items()
               if isinstance(v, int | float) and not isinstance(v, bool)} \
        if isinstance(lat, dict) else {}
    return ModelStats(_count(entry.get("ok")), _count(entry.get("errors")), latency)


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    message: str
    measured: dict[str, float] = field(default_factory=dict)


class RolloutEngine:
    """Moves rollouts on, one `step()` at a time; state lives in the registry only."""

    def __init__(self, store: RolloutStore, desired: DesiredIO, *, driver: str,
                 lease_s: float = DEFAULT_LEASE_S, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = store.registry
        self.desired = desired
        self.driver = driver
        self.lease_s = lease_s
        self.clock = clock

    # -- the loop ---------------------------------------------------------------------

    def step(self, only: int | None = None) -> None:
        """One pass over the rollouts this engine may drive (`only`: just that one)."""
        rollouts = self.store.all()
        followers = self._followers(rollouts)
        for r in rollouts:
            if only is not None and r.id != only:
                continue
            if r.status in TERMINAL and r.id not in followers:
                continue
            if not self.store.claim(r.id, self.driver, self.clock(), self.lease_s):
                continue
            try:
                self._step(r)
            except (BrokerError, DeployError, RegistryUnavailable) as exc:
                # Nothing half-done is lost: every device's progress is written as it
                # happens, and the next step goes on from there.
                log.warning("rollout %s: %s (retrying)", r.id, exc)

    def release_all(self) -> None:
        with contextlib.suppress(RegistryError):
            for r in self.store.all():
                if r.driver == self.driver:
                    self.store.release(r.id, self.driver)

    def _followers(self, rollouts: list[Rollout]) -> set[int]:
        """Completed rollouts that still hand their version to late joiners: per (group,
        model), the newest completed one, unless a newer one of them is still active."""
        latest: dict[tuple[str, str], Rollout] = {}
        for r in rollouts:  # by id: newer last
            key = (r.selector, r.model)
            if r.status == COMPLETED or r.status not in TERMINAL:
                latest[key] = r
        return {r.id for r in latest.values() if r.status == COMPLETED}

    def _step(self, r: Rollout) -> None:
        if r.status == PAUSED:
            return
        if r.status == ABORTING:
            self._roll_back(r, ABORTED, r.reason or "aborted by an operator")
            return
        devices = self.store.devices(r.id)
        self._check_pending(r, devices)
        if r.status == COMPLETED:
            self._late_joiners(r, devices)
            return
        group = self._group(r, devices)
        failed = [d for d in devices if d.state == FAILED]
        limit = parse_amount(r.max_failures, "--max-failures").of(len(group))
        if len(failed) > limit:
            names = ", ".join(f"{d.device_id} ({d.error})" for d in failed[:5])
            self._roll_back(r, HALTED, f"{len(failed)} install failures, more than "
                                       f"--max-failures {r.max_failures} ({limit}): {names}")
            return
        if r.phase == BAKING:
            self._bake(r, devices)
        if r.status == RUNNING and r.phase == DEPLOYING:  # also right after a bake ended
            self._deploy_wave(r, devices, self._group(r, devices))

    def _group(self, r: Rollout, devices: list[RolloutDevice]) -> list[Device]:
        """The group now: matching devices online, and every device already touched."""
        touched = {d.device_id for d in devices}
        return [d for d in self.registry.devices(parse_selector(r.selector))
                if d.online or d.device_id in touched]

    def _deploy_wave(self, r: Rollout, devices: list[RolloutDevice], group: list[Device]) -> None:
        waves = r.wave_amounts()
        target = min(max(waves[r.wave].of(len(group)), 1 if group else 0), len(group))
        touched = {d.device_id for d in devices}
        for dev in group:
            if len(touched) >= target:
                break
            if dev.device_id not in touched and dev.online:
                devices.append(self._publish_target(r, dev))
                touched.add(dev.device_id)
        if any(d.state == PENDING for d in devices):
            return
        r.phase, r.bake_until = BAKING, self.clock() + r.bake_s
        self.store.save(r)
        log.info("rollout %s wave %d/%d: %d devices, baking %.3gs", r.id, r.wave + 1,
                 len(waves), len(touched), r.bake_s)

    def _bake(self, r: Rollout, devices: list[RolloutDevice]) -> None:
        verdict = self.evaluate(r, devices)
        if not verdict.healthy:
            self._roll_back(r, ROLLED_BACK, f"health gate broken: {verdict.message}")
            return
        if r.bake_until is not None and self.clock() < r.bake_until:
            return
        if r.wave + 1 >= len(r.waves):
            r.status, r.phase, r.bake_until = COMPLETED, BAKING, None
            r.reason = None
            log.info("rollout %s completed: %s on %s", r.id, r.target, r.selector)
        else:
            r.wave, r.phase, r.bake_until = r.wave + 1, DEPLOYING, None
        self.store.save(r)

    # -- devices ----------------------------------------------------------------------

    def _publish_target(self, r: Rollout, dev: Device) -> RolloutDevice:
        current, applied = self.desired.read(dev.device_id)
        prev = next((m for m in (current.models if current else []) if m.name == r.model), None)
        spec = msgspec.convert(r.spec, ModelSpec)
        manifest = next_manifest(current, upsert=spec, applied=applied)
        now = self.clock()
        record = RolloutDevice(
            r.id, dev.device_id, r.wave, PENDING, manifest.revision, now,
            now + r.install_timeout_s, dev.reported_at,
            None if prev is None else msgspec.to_builtins(prev))
        # Recorded before publishing: a crash in between leaves a pending device whose
        # previous version is known, never a published manifest nobody remembers.
        self.store.put_device(record)
        self.desired.publish(dev.device_id, manifest)
        log.info("rollout %s: %s -> %s (revision %d)", r.id, dev.device_id, r.target,
                 manifest.revision)
        return record

    def _check_pending(self, r: Rollout, devices: list[RolloutDevice]) -> None:
        now = self.clock()
        for d in devices:
            if d.state != PENDING or d.reverted:
                continue
            dev = self.registry.device(d.device_id)
            outcome = self._install_outcome(r, d, dev, now)
            if outcome is None:
                continue
            d.state, d.error = outcome
            if d.state == SERVING:
                telemetry = self.registry.telemetry(d.device_id)
                stats = model_stats(telemetry.body if telemetry else None, r.target)
                d.base_ok, d.base_errors = (stats.ok, stats.errors) if stats else (0, 0)
            self.store.put_device(d)
            log.info("rollout %s: %s %s%s", r.id, d.device_id, d.state,
                     f" ({d.error})" if d.error else "")

    def _install_outcome(self, r: Rollout, d: RolloutDevice, dev: Device | None,
                         now: float) -> tuple[str, str | None] | None:
        if dev is not None:
            entry = find_model({"models": dev.models}, r.model, r.version)
            fresh = dev.reported_at != d.reported_before or (
                dev.revision is not None and d.revision is not None and dev.revision >= d.revision)
            if entry is not None and entry.get("sha256") in (None, r.sha256):
                if entry.get("state") == "serving":
                    return SERVING, None
                if entry.get("state") == "failed" and fresh:
                    return FAILED, str(entry.get("error") or "failed")
            error = dev.last_error or ""
            if d.revision is not None and error.startswith(f"manifest revision {d.revision} refused"):
                return FAILED, error
        if now >= d.deadline:
            return FAILED, f"not serving after {r.install_timeout_s:g}s"
        return None

    def _late_joiners(self, r: Rollout, devices: list[RolloutDevice]) -> None:
        touched = {d.device_id for d in devices}
        last_wave = len(r.waves) - 1
        for dev in self.registry.devices(parse_selector(r.selector)):
            if dev.device_id in touched or not dev.online:
                continue
            entry = find_model({"models": dev.models}, r.model, r.version)
            if entry is not None and entry.get("state") == "serving":
                # Already serves it (deployed by hand): nothing to publish.
                self.store.put_device(RolloutDevice(
                    r.id, dev.device_id, last_wave, SERVING, None, self.clock(), self.clock()))
                continue
            d = self._publish_target(r, dev)
            d.wave = last_wave
            self.store.put_device(d)
            log.info("rollout %s: late joiner %s gets %s", r.id, dev.device_id, r.target)

    def _roll_back(self, r: Rollout, status: str, reason: str) -> None:
        """Every touched device back to its previous version; then the final status."""
        for d in self.store.devices(r.id):
            if d.reverted:
                continue
            self._revert(r, d)
            d.reverted = True
            self.store.put_device(d)
        r.status, r.reason, r.bake_until = status, reason, None
        self.store.save(r)
        log.warning("rollout %s %s: %s", r.id, status, reason)

    def _revert(self, r: Rollout, d: RolloutDevice) -> None:
        current, applied = self.desired.read(d.device_id)
        ours = next((m for m in (current.models if current else [])
                     if m.name == r.model and m.version == r.version), None)
        if ours is None:
            return  # someone changed the device since: leave their change alone
        if d.prev_spec is not None:
            manifest = next_manifest(current, upsert=msgspec.convert(d.prev_spec, ModelSpec),
                                     applied=applied, rollback=True)
        else:
            manifest = next_manifest(current, remove=r.model, applied=applied)
        self.desired.publish(d.device_id, manifest)
        log.info("rollout %s: %s back to %s", r.id, d.device_id,
                 f"{r.model}:{d.prev_spec.get('version')}" if d.prev_spec else f"no {r.model}")

    # -- health -----------------------------------------------------------------------

    def evaluate(self, r: Rollout, devices: list[RolloutDevice]) -> Verdict:
        """The health gate over every device serving the version in this rollout."""
        rules = parse_health(r.health)
        ok = errors = 0
        worst: dict[str, tuple[float, str]] = {}
        for d in devices:
            if d.state != SERVING:
                continue
            telemetry = self.registry.telemetry(d.device_id)
            stats = model_stats(telemetry.body if telemetry else None, r.target)
            if stats is None:
                continue
            new_ok, new_errors = max(stats.ok - d.base_ok, 0), max(stats.errors - d.base_errors, 0)
            ok, errors = ok + new_ok, errors + new_errors
            if new_ok + new_errors == 0:
                continue  # no job on the version yet: its percentiles say nothing
            for q in ("p50", "p95", "p99"):
                value = stats.latency_ms.get(q)
                if value is not None and value > worst.get(q, (-1.0, ""))[0]:
                    worst[q] = (value, d.device_id)
        measured: dict[str, float] = {}
        where: dict[str, str] = {}
        if ok + errors:
            measured["error_rate"] = errors / (ok + errors)
            where["error_rate"] = f"{errors} of {ok + errors} jobs"
        for q, (value, dev_id) in worst.items():
            measured[f"{q}_ms"] = value
            where[f"{q}_ms"] = dev_id
        for rule in rules:
            value = measured.get(rule.metric)
            if value is not None and not rule.holds(value):
                shown = f"{value * 100:.3g}%" if rule.metric == "error_rate" else f"{value:.4g}"
                return Verdict(False, f"{rule.metric} {shown} ({where[rule.metric]}) breaks "
                                      f"{rule}", measured)
        return Verdict(True, "healthy" if measured else "no jobs yet", measured)


# -- running it -----------------------------------------------------------------------------


class RolloutRunner:
    """The engine on a thread with its own MQTT connection (inside `edge-fleet serve`, or
    `rollout start --drive`). Survives broker and database outages: it retries."""

    def __init__(self, registry: SqlRegistry, connect: Callable[[], Connection], *, prefix: str,
                 driver: str, signer: Signer | None = None, tick_s: float = 1.0,
                 lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = RolloutStore(registry)
        self._connect = connect
        self.prefix = prefix
        self.driver = driver
        self.signer = signer
        self.tick_s = tick_s
        self.lease_s = lease_s
        self.only: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None

    def start(self) -> RolloutRunner:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rollouts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        engine: RolloutEngine | None = None
        try:
            while not self._stop.is_set():
                try:
                    if engine is None:
                        self._conn = self._connect()
                        engine = RolloutEngine(
                            self.store, MqttDesired(self._conn, self.prefix, self.signer),
                            driver=self.driver, lease_s=self.lease_s)
                    engine.step(self.only)
                except BrokerError as exc:
                    log.warning("rollouts: %s (retrying)", exc)
                    if self._conn is not None:
                        self._conn.close()
                    self._conn, engine = None, None
                except Exception:
                    log.exception("rollout step failed (retrying)")
                self._stop.wait(self.tick_s)
        finally:
            if engine is not None:
                engine.release_all()
            if self._conn is not None:
                self._conn.close()


# -- progress, for the CLI ------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    rollout: Rollout
    devices: list[RolloutDevice]
    group_size: int

    @property
    def serving(self) -> int:
        return sum(1 for d in self.devices if d.state == SERVING and not d.reverted)

    @property
    def failed(self) -> int:
        return sum(1 for d in self.devices if d.state == FAILED)

    @property
    def pending(self) -> int:
        return sum(1 for d in self.devices if d.state == PENDING and not d.reverted)

    def bake_left(self, now: float) -> float | None:
        r = self.rollout
        if r.status != RUNNING or r.phase != BAKING or r.bake_until is None:
            return None
        return max(r.bake_until - now, 0.0)

    def line(self) -> str:
        r = self.rollout
        text = (f"rollout {r.id} {r.target} on {r.selector or '(all devices)'}: {r.status}, "
                f"wave {r.wave + 1}/{len(r.waves)} ({r.waves[r.wave]}) {r.phase}; "
                f"{self.serving} serving, {self.pending} pending, {self.failed} failed "
                f"of {self.group_size}")
        return f"{text}; {r.reason}" if r.reason else text


def progress(store: RolloutStore, rollout_id: int) -> Progress:
    r = store.get(rollout_id)
    if r is None:
        raise RolloutError(f"no rollout {rollout_id}")
    devices = store.devices(rollout_id)
    touched = {d.device_id for d in devices}
    group = [d for d in store.registry.devices(parse_selector(r.selector))
             if d.online or d.device_id in touched]
    return Progress(r, devices, len(group))
