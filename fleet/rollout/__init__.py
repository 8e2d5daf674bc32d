"""Rollouts: a model version to a group of devices, wave by wave, with health gates.

    edge-fleet rollout start digits:4 --group site=berlin --waves 1,10%,50%,100% \\
        --max-failures 5% --health "error_rate<1%,p95_ms<50" --bake 60s

    spec.py      statuses, the command line's specs (waves, --max-failures, --health),
                 the records Rollout and RolloutDevice
    store.py     RolloutStore: the rollout tables in the registry's database
    health.py    the health gate of a bake, from the devices' telemetry
    engine.py    RolloutEngine: one step at a time, wave by wave (how it works: there)
    runner.py    RolloutRunner: the engine on a thread with its own MQTT connection
    progress.py  Progress: where a rollout stands, for the CLI

Everything other modules use is exported here: import from `edgeinfer.fleet.rollout`.
"""

from __future__ import annotations

from edgeinfer.fleet.rollout.engine import DEFAULT_LEASE_S, DesiredIO, RolloutEngine
from edgeinfer.fleet.rollout.health import ModelStats, Verdict, evaluate, model_stats
from edgeinfer.fleet.rollout.progress import Progress, progress
from edgeinfer.fleet.rollout.runner import MqttDesired, RolloutRunner
from edgeinfer.fleet.rollout.spec import (
    ABORTED,
    ABORTING,
    BAKING,
    COMPLETED,
    DEFAULT_INSTALL_TIMEOUT_S,
    DEPLOYING,
    FAILED,
    HALTED,
    PAUSED,
    PENDING,
    ROLLED_BACK,
    RUNNING,
    SERVING,
    TERMINAL,
    Amount,
    Rollout,
    RolloutDevice,
    RolloutError,
    Rule,
    parse_amount,
    parse_health,
    parse_waves,
)
from edgeinfer.fleet.rollout.store import RolloutStore

__all__ = [
    "ABORTED",
    "ABORTING",
    "BAKING",
    "COMPLETED",
    "DEFAULT_INSTALL_TIMEOUT_S",
    "DEFAULT_LEASE_S",
    "DEPLOYING",
    "FAILED",
    "HALTED",
    "PAUSED",
    "PENDING",
    "ROLLED_BACK",
    "RUNNING",
    "SERVING",
    "TERMINAL",
    "Amount",
    "DesiredIO",
    "ModelStats",
    "MqttDesired",
    "Progress",
    "Rollout",
    "RolloutDevice",
    "RolloutEngine",
    "RolloutError",
    "RolloutRunner",
    "RolloutStore",
    "Rule",
    "Verdict",
    "evaluate",
    "model_stats",
    "parse_amount",
    "parse_health",
    "parse_waves",
    "progress",
]
