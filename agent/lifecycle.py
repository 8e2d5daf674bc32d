"""The daemon's life under systemd: ready, watched, reloaded, drained.

- READY=1 once the stored models are loaded and warmed (`Agent.start` restores them
  before it connects) and the broker session is up (CONNACK and SUBACK), or, with the
  broker out of reach, after `broker.connect_timeout_s`: a gateway serves locally without
  its broker, and systemd's start timeout must not kill it for that. STATUS= says which.
- WATCHDOG=1 every half `WATCHDOG_USEC` while the job loop and the MQTT loop are healthy:
  no job thread has died, no job has run longer than `service.job_stall_s`, and the
  MQTT network thread went round its loop within `service.network_stall_s`.
- SIGTERM/SIGINT: STOPPING=1, take no more jobs (the broker keeps new ones for the
  next start), answer the ones taken for up to `service.drain_timeout_s`, stop, exit 0.
- SIGHUP: re-read the config file. Keys in `LIVE_KEYS` apply at once; other changes are
  named as needing a restart; a config that does not load is refused, naming the key,
  and the running one stays. Logged, and sent as an event (`config_reloaded`,
  `config_rejected`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from edgeinfer.agent.config import AgentConfig, ConfigError, ServiceConfig, load_config
from edgeinfer.agent.systemd import Notifier, Watchdog, one_line, watchdog_interval
from edgeinfer.contract.brokerurl import parse_broker_url

if TYPE_CHECKING:
    from edgeinfer.agent.daemon import Agent

log = logging.getLogger(__name__)

# What a SIGHUP can change without a restart.
LIVE_KEYS = frozenset({
    "log.level",
    "telemetry.interval_s",
    "service.drain_timeout_s",
    "service.job_stall_s",
    "service.network_stall_s",
})


class JobProbe(Protocol):
    def longest_job(self) -> tuple[str, float] | None: ...
    def dead_threads(self) -> list[str]: ...


class NetworkProbe(Protocol):
    def loop_age(self) -> float: ...


def health_problem(jobs: JobProbe, network: NetworkProbe, limits: ServiceConfig) -> str | None:
    """None when the job loop and the MQTT loop are both alive and moving, else what is not.

    A worker waiting for work, or waiting for the broker to take answers (outbox full),
    is healthy: only a job that runs too long counts, since no restart cures an absent
    broker but one does cure a hung runtime or driver.
    """
    dead = jobs.dead_threads()
    if dead:
        return f"job thread(s) died: {', '.join(dead)}"
    longest = jobs.longest_job()
    if longest is not None and longest[1] > limits.job_stall_s:
        return (f"{longest[0]} has run one job for longer than service.job_stall_s "
                f"({limits.job_stall_s:g}s): the job loop is stalled")
    age = network.loop_age()
    if age == float("inf"):
        return "the MQTT network thread has died"
    if age > limits.network_stall_s:
        return (f"the MQTT network thread has not gone round its loop for longer than "
                f"service.network_stall_s ({limits.network_stall_s:g}s)")
    return None


def flatten(cfg: AgentConfig) -> dict[str, Any]:
    """{"broker.url": ..., "jobs.workers": ...}: every leaf key of a config by its path."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = node

    walk("", msgspec.to_builtins(cfg))
    return out


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class Lifecycle:
    """Runs an `Agent` as a systemd service; `run()` returns the exit code."""

    def __init__(
        self,
        agent: Agent,
        config_path: Path | None,
        notifier: Notifier | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.agent = agent
        self._config_path = config_path
        self._environ = environ
        self.notifier = notifier if notifier is not None else Notifier.from_environ(environ)
        self._running = flatten(agent.cfg)  # as started, with live changes applied since
        self._limits = agent.cfg.service
        self._broker = str(parse_broker_url(agent.cfg.broker.url))
        self._stop_asked = threading.Event()
        self._reload_asked = threading.Event()
        self._wake = threading.Event()
        self._status = ""
        self._note = ""  # what the last reload left to say: refused, or restart needed
        interval = watchdog_interval(environ)
        self.watchdog: Watchdog | None = None
        if interval is not None and self.notifier.enabled:
            self.watchdog = Watchdog(self.notifier, interval, self.health, self._status_text)

    # --- signals (handlers run on the main thread between bytecodes: only set flags) -----

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)  # its default would end the process

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_asked.set()
        else:
            self._stop_asked.set()
        self._wake.set()

    # --- the run -------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signal_handlers()
        self.notifier.status("starting: loading and warming the stored models")
        self.agent.start()
        try:
            if not self._stop_asked.is_set():
                self._become_ready()
            self._serve()
        finally:
            code = self._shutdown()
        return code

    def _become_ready(self) -> None:
        timeout = self.agent.cfg.broker.connect_timeout_s
        connected = self._wait_session(timeout)
        if connected:
            status = self._status_text()
        else:
            models = len(self.agent.registry.snapshot())
            status = (f"serving {models} model(s) locally; broker {self._broker} not reached "
                      f"within broker.connect_timeout_s ({timeout:g}s), still trying")
        self._set_status(status, "READY=1")
        log.info("ready: %s", status)
        if self.watchdog is not None:
            self.watchdog.start()

    def _wait_session(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._stop_asked.is_set():
            left = deadline - time.monotonic()
            if self.agent.mqtt.subscribed.wait(max(0.0, min(0.1, left))):
                return True
            if left <= 0:
                return False
        return False

    def _serve(self) -> None:
        while not self._stop_asked.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._reload_asked.is_set() and not self._stop_asked.is_set():
                self._reload_asked.clear()
                self.reload()
            elif self.watchdog is None or self.watchdog.problem is None:
                status = self._status_text()
                if status != self._status:  # the broker came or went, a model was deployed
                    self._set_status(status)

    def _shutdown(self) -> int:
        timeout = self._limits.drain_timeout_s
        log.info("stopping: answering the jobs already taken (up to %gs)", timeout)
        self.notifier.notify("STOPPING=1", "STATUS=stopping: answering the jobs already taken")
        t0 = time.monotonic()
        # Pool jobs first: the pool session ends with the process and its jobs with it.
        self.agent.leave_pools(min(2.0, timeout / 4))
        left = self.agent.scheduler.drain(max(0.0, t0 + timeout - time.monotonic()))
        if left:
            log.warning("drain timed out after %.1fs: %d job(s) unanswered stay in the journal "
                        "and run after the next start", time.monotonic() - t0, left)
        else:
            log.info("all jobs taken are answered (%.2fs)", time.monotonic() - t0)
        if self.agent.mqtt.connected.is_set():
            # The answers are in the outbox; give them what is left of the drain time to go out.
            self.agent.outbox.drain(max(0.0, t0 + timeout - time.monotonic()))
        if self.watchdog is not None:
            self.watchdog.stop()  # stopping the agent's threads is not a stall
        self.agent.stop()
        log.info("stopped")
        self.notifier.close()
        return 0

    # --- health and status ---------------------------------------------------------------

    def health(self) -> str | None:
        return health_problem(self.agent.scheduler, self.agent.network, self._limits)

    def _status_text(self) -> str:
        models = len(self.agent.registry.snapshot())
        if self.agent.mqtt.subscribed.is_set():
            text = f"serving {models} model(s); broker {self._broker} connected"
        else:
            text = f"serving {models} model(s) locally; broker {self._broker} not connected, retrying"
        return f"{text}; {self._note}" if self._note else text

    def _set_status(self, status: str, *more: str) -> None:
        self._status = status
        self.notifier.notify(*more, f"STATUS={one_line(status)}")

    # --- SIGHUP --------------------------------------------------------------------------

    def reload(self) -> None:
        # systemd shows "reloading" until the READY=1 below (MONOTONIC_USEC: systemd >= 253).
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(self._config_path, self._environ)
        except ConfigError as exc:
            log.error("config reload refused, the running config stays: %s", exc)
            self.agent.emit_event("config_rejected", message=str(exc))
            self._note = f"config reload refused: {exc}"
            self._set_status(self._status_text(), "READY=1")
            return
        fresh = flatten(new)
        changed = changed_keys(self._running, fresh)
        live = [k for k in changed if k in LIVE_KEYS]
        restart = [k for k in changed if k not in LIVE_KEYS]
        applied = [f"{k} ({self._running.get(k)} -> {fresh.get(k)})" for k in live]
        self._apply(new)
        for key in live:
            self._running[key] = fresh[key]
        if not changed:
            log.info("config reloaded: no change")
        else:
            log.info("config reloaded: applied %s; needs a restart: %s",
                     ", ".join(applied) or "nothing", ", ".join(restart) or "nothing")
        self.agent.emit_event("config_reloaded", applied=live, restart_needed=restart)
        self._note = f"restart to apply {', '.join(restart)}" if restart else ""
        self._set_status(self._status_text(), "READY=1")

    def _apply(self, new: AgentConfig) -> None:
        """Put the live keys of `new` into effect."""
        logging.getLogger().setLevel(new.log.level.upper())
        self.agent.telemetry.set_interval(new.telemetry.interval_s)
        self._limits = new.service


def run_service(agent: Agent, config_path: Path | None) -> int:
    return Lifecycle(agent, config_path).run()
