"""A TEST HOOK, not a feature: crash the agent at one stage of a deploy.

`EDGE_AGENT_TEST_CRASH_AT=<stage>` in the agent's environment, read once when the
reconciler is built, makes the agent kill itself with SIGKILL when a deploy reaches that
stage, so that tests can prove a crash at any moment leaves the old version or the new
one serving, never a mix, and no temporary files. Only deploys driven by a desired
manifest crash; restoring from the store at start-up never does. Never set it on a
gateway.

Stages, in the order a deploy reaches them:

- `download`: the first bytes of the artifact are in `state_dir/tmp/`
- `verify`:   the whole artifact is in `tmp/`, fsynced, not yet checked
- `install`:  the verified artifact has just been renamed into `models/sha256/`
- `load`:     a runtime is about to load it
- `warm-up`:  loaded and warmed up by the runtime; the health gate is about to run
- `swap`:     the new set serves in memory; the new `applied.json` is written to a temporary
  file, not yet renamed over the old one
- `cleanup`:  the new `applied.json` is in place; unreferenced artifacts not yet removed
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping

log = logging.getLogger(__name__)

CRASH_ENV = "EDGE_AGENT_TEST_CRASH_AT"
STAGES = ("download", "verify", "install", "load", "warm-up", "swap", "cleanup")


def crash_stage_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The stage named by $EDGE_AGENT_TEST_CRASH_AT, or None; ValueError for an unknown one."""
    value = (os.environ if environ is None else environ).get(CRASH_ENV, "").strip()
    if not value:
        return None
    if value not in STAGES:
        raise ValueError(f"{CRASH_ENV}={value!r} is not a stage; stages: {', '.join(STAGES)}")
    log.warning("TEST HOOK %s=%s: this agent will kill itself at that deploy stage", CRASH_ENV, value)
    return value


class CrashPoint:
    """Kills the process when `reached(stage)` names the armed stage while armed."""

    def __init__(self, stage: str | None) -> None:
        self.stage = stage
        self.live = False  # set by the reconciler around desired-state deploys only

    def reached(self, stage: str) -> None:
        if self.live and stage == self.stage:
            log.critical("TEST HOOK: killing the agent at stage %r", stage)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)


# --- a second TEST HOOK: a runtime that starts failing ------------------------------------

FAIL_RUNTIME_ENV = "EDGE_AGENT_TEST_FAIL_RUNTIME"


def failing_runtime_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """`EDGE_AGENT_TEST_FAIL_RUNTIME=<runtime>@<N>`: from the Nth job inference on a serving
    session of <runtime> (counted across this process, warm-up and tuning runs excluded) on,
    every inference of that runtime raises (agent/failover.py `RuntimeFault`), so that
    tests can prove a live failover to the next candidate. Read once at start; never set
    it on a gateway.
    Returns (runtime, N) or None; ValueError for a malformed value.
    """
    value = (os.environ if environ is None else environ).get(FAIL_RUNTIME_ENV, "").strip()
    if not value:
        return None
    runtime, sep, count = value.partition("@")
    if not sep or not runtime or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{FAIL_RUNTIME_ENV}={value!r} must look like <runtime>@<N>, N >= 1")
    log.warning("TEST HOOK %s=%s: runtime %s will fail from its inference #%s on",
                FAIL_RUNTIME_ENV, value, runtime, count)
    return runtime, int(count)
