"""The rollout tables (`rollouts`, `rollout_devices`) in the registry's database.

They live next to the registry's own tables, created on first use, and are written
through the registry's public transactions (`SqlRegistry.transaction()`), so the CLI
and the controller share rollouts exactly as they share devices, on SQLite or
PostgreSQL alike.
"""

# S608: queries are built only from this module's constant column lists; values are parameters.
# ruff: noqa: S608

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from edgeinfer.fleet.registry import SqlRegistry, utc_now
from edgeinfer.fleet.rollout.spec import (
    ABORTING,
    BAKING,
    PAUSED,
    RUNNING,
    Rollout,
    RolloutDevice,
    RolloutError,
)

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
        with registry.transaction() as ex:
            for stmt in _TABLES.split(";"):
                if stmt.strip():
                    ex(stmt)

    def create(self, r: Rollout) -> Rollout:
        now = utc_now()
        with self.registry.transaction() as ex:
            new_id = int(ex("SELECT COALESCE(MAX(id), 0) + 1 FROM rollouts")[0][0])
            ex(f"INSERT INTO rollouts ({_R_COLS}) VALUES "
               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               [new_id, r.model, r.version, r.sha256, _dumps(r.spec), r.selector,
                _dumps(r.waves), r.max_failures, r.health, r.bake_s, r.install_timeout_s,
                r.status, r.wave, r.phase, r.bake_until, r.reason, now, now, None, None])
        created = self.get(new_id)
        assert created is not None
        return created

    def get(self, rollout_id: int) -> Rollout | None:
        with self.registry.transaction() as ex:
            rows = ex(f"SELECT {_R_COLS} FROM rollouts WHERE id = ?", [rollout_id])
        return _rollout(rows[0]) if rows else None

    def all(self, statuses: Iterable[str] | None = None) -> list[Rollout]:
        with self.registry.transaction() as ex:
            rows = ex(f"SELECT {_R_COLS} FROM rollouts ORDER BY id")
        found = [_rollout(r) for r in rows]
        if statuses is not None:
            wanted = set(statuses)
            found = [r for r in found if r.status in wanted]
        return found

    def save(self, r: Rollout) -> None:
        """Write the fields a step changes."""
        sets = ", ".join(f"{c} = ?" for c in _R_MUTABLE)
        with self.registry.transaction() as ex:
            ex(f"UPDATE rollouts SET {sets}, updated_at = ? WHERE id = ?",
               [*(getattr(r, c) for c in _R_MUTABLE), utc_now(), r.id])

    def claim(self, rollout_id: int, driver: str, now: float, lease_s: float) -> bool:
        """Take (or renew) the right to drive a rollout; False while another holds it."""
        with self.registry.transaction() as ex:
            rows = ex(
                "UPDATE rollouts SET driver = ?, lease_until = ? WHERE id = ? AND "
                "(driver IS NULL OR driver = ? OR lease_until IS NULL OR lease_until < ?) "
                "RETURNING id", [driver, now + lease_s, rollout_id, driver, now])
        return bool(rows)

    def release(self, rollout_id: int, driver: str) -> None:
        with self.registry.transaction() as ex:
            ex("UPDATE rollouts SET driver = NULL, lease_until = NULL WHERE id = ? AND driver = ?",
               [rollout_id, driver])

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
        # Only while the status still allows it: a driver or another operator may have
        # moved it since the read above.
        with self.registry.transaction() as ex:
            if action == "resume":
                # The bake starts over: what was watched before the pause is not enough.
                changed_ids = ex(
                    "UPDATE rollouts SET status = ?, bake_until = CASE WHEN phase = ? "
                    "THEN ? + bake_s ELSE bake_until END, updated_at = ? "
                    "WHERE id = ? AND status IN (?) RETURNING id",
                    [new_status, BAKING, moment, utc_now(), rollout_id, PAUSED])
            else:
                marks = ", ".join("?" for _ in allowed)
                changed_ids = ex(
                    f"UPDATE rollouts SET status = ?, updated_at = ? WHERE id = ? "
                    f"AND status IN ({marks}) RETURNING id",
                    [new_status, utc_now(), rollout_id, *sorted(allowed)])
        if not changed_ids:
            raise RolloutError(f"rollout {rollout_id} changed meanwhile: try again")
        changed = self.get(rollout_id)
        assert changed is not None
        return changed

    def devices(self, rollout_id: int) -> list[RolloutDevice]:
        with self.registry.transaction() as ex:
            rows = ex(f"SELECT {_D_COLS} FROM rollout_devices WHERE rollout_id = ? "
                      "ORDER BY wave, device_id", [rollout_id])
        return [_device(r) for r in rows]

    def put_device(self, d: RolloutDevice) -> None:
        values = [d.rollout_id, d.device_id, d.wave, d.state, d.revision, d.published_at,
                  d.deadline, d.reported_before,
                  None if d.prev_spec is None else _dumps(d.prev_spec), d.base_ok,
                  d.base_errors, d.error, int(d.reverted), utc_now()]
        updates = ", ".join(f"{c.strip()} = excluded.{c.strip()}" for c in _D_COLS.split(",")[2:])
        with self.registry.transaction() as ex:
            ex(f"INSERT INTO rollout_devices ({_D_COLS}) VALUES "
               "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
               f"ON CONFLICT (rollout_id, device_id) DO UPDATE SET {updates}", values)
