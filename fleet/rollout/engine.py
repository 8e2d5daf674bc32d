"""The rollout engine: moves every rollout it drives one step on.

A rollout is a row in the registry (tables `rollouts` and `rollout_devices`, created
next to the registry's own); the engine (`RolloutEngine.step`) moves every rollout it
drives one step on, reading what the controller ingested (`reported`, `telemetry`) from
the same registry and publishing desired manifests (through `DesiredIO`: over MQTT in
fleet/rollout/runner.py, a dict in the unit tests). All progress is written
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

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from edgeinfer.contract import lenient
from edgeinfer.contract.documents import ModelEntry, Reported
from edgeinfer.contract.manifest import Manifest, ModelSpec
from edgeinfer.fleet.deploy import DeployError, next_manifest
from edgeinfer.fleet.mqtt import BrokerError
from edgeinfer.fleet.registry import Device, RegistryError, RegistryUnavailable, parse_selector
from edgeinfer.fleet.rollout.health import Verdict, evaluate, model_stats
from edgeinfer.fleet.rollout.spec import (
    ABORTED,
    ABORTING,
    BAKING,
    COMPLETED,
    DEPLOYING,
    FAILED,
    HALTED,
    PAUSED,
    PENDING,
    ROLLED_BACK,
    RUNNING,
    SERVING,
    TERMINAL,
    Rollout,
    RolloutDevice,
    parse_amount,
)
from edgeinfer.fleet.rollout.store import RolloutStore

# The package's name, as before the package was split: log filters keep matching.
log = logging.getLogger(__package__)

DEFAULT_LEASE_S = 15.0


class DesiredIO(Protocol):
    """How the engine reads and writes a device's desired manifest."""

    def read(self, device_id: str) -> tuple[Manifest | None, int | None]: ...

    def publish(self, device_id: str, manifest: Manifest) -> None: ...


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
            entry = _served(dev, r)
            fresh = dev.reported_at != d.reported_before or (
                dev.revision is not None and d.revision is not None and dev.revision >= d.revision)
            if entry is not None and entry.sha256 in (None, r.sha256):
                if entry.state == "serving":
                    return SERVING, None
                if entry.state == "failed" and fresh:
                    return FAILED, entry.error or "failed"
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
            entry = _served(dev, r)
            if entry is not None and entry.state == "serving":
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
        return evaluate(r, devices, self.registry.telemetry)


def _served(dev: Device, r: Rollout) -> ModelEntry | None:
    """The rollout's model version in what `dev` last reported (read leniently)."""
    reported = lenient.convert({"models": dev.models}, Reported)
    return reported.find_model(r.model, r.version) if reported is not None else None
