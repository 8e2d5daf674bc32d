"""Where a rollout stands, for the CLI: devices serving, pending and failed, and the bake."""

from __future__ import annotations

from dataclasses import dataclass

from edgeinfer.fleet.registry import parse_selector
from edgeinfer.fleet.rollout.spec import (
    BAKING,
    FAILED,
    PENDING,
    RUNNING,
    SERVING,
    Rollout,
    RolloutDevice,
    RolloutError,
)
from edgeinfer.fleet.rollout.store import RolloutStore


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

