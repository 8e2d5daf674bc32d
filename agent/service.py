"""The agent: wires config, store, runtimes, reconciler, scheduler, MQTT and telemetry."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import msgspec

from agent import __version__
from agent.config import AgentConfig
from agent.metrics import Metrics
from agent.mqtt_session import Inbound, MqttSession, Retained, Route
from agent.reconciler import Reconciler
from agent.registry import ModelRegistry
from agent.scheduler import Scheduler
from agent.store import ModelStore
from agent.telemetry import TelemetryLoop, start_prometheus
from agent.topics import Topics
from runtimes.hardware import HardwareInfo, detect

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Agent:
    def __init__(self, cfg: AgentConfig, hardware: HardwareInfo | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.topic_prefix, cfg.device_id)
        self.session_id = uuid.uuid4().hex
        self.started_at = _now_iso()
        self.hardware = hardware if hardware is not None else detect()
        cfg.state_path.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(cfg.state_path)
        self.registry = ModelRegistry()
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            registry=self.registry,
            metrics=self.metrics,
            publish=self._publish_result,
            results_topic=self.topics.results,
            reply_prefixes=cfg.reply_prefixes_resolved(),
            workers=cfg.jobs.workers,
            queue_size=cfg.jobs.queue_size,
            max_payload_bytes=cfg.jobs.max_payload_bytes,
            max_tensor_elements=cfg.jobs.max_tensor_elements,
        )
        self.reconciler = Reconciler(
            cfg, self.store, self.registry, self.hardware, self.emit_event, self.publish_reported
        )
        routes = [
            Route(self.topics.desired, 1, self._on_desired),
            Route(self.topics.jobs, 1, self.scheduler.submit),
            *(Route(self.topics.pool_subscription(p), 1, self.scheduler.submit)
              for p in cfg.jobs.pools),
        ]
        self.mqtt = MqttSession(
            client_id=cfg.device_id,
            cfg=cfg.broker,
            routes=routes,
            will=Retained(self.topics.state, self._state_payload("offline")),
            on_connected=self._on_connected,
        )
        self.telemetry = TelemetryLoop(
            cfg.telemetry.interval_s,
            cfg.state_path,
            self.metrics,
            self.scheduler.depth,
            lambda doc: self._publish(self.topics.telemetry, _json.encode(doc), qos=0),
        )
        self._stop_prometheus: Any = None
        self._stopped = threading.Event()
        self._reported_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        removed = self.store.clear_tmp()
        if removed:
            log.info("removed %d unfinished download(s)", removed)
        # Serve what we had before the broker answers: a gateway must work offline.
        restored = self.reconciler.restore()
        log.info("restored %d model(s) in %.2fs", restored, time.monotonic() - t0)
        self.scheduler.start()
        self.reconciler.start()
        self.mqtt.start()
        self.telemetry.start()
        if self.cfg.telemetry.prometheus_port:
            self._stop_prometheus = start_prometheus(
                self.cfg.telemetry.prometheus_port, self.metrics, self.scheduler.depth,
                self.cfg.state_path,
            )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.telemetry.stop()
        self.reconciler.stop()
        self.scheduler.stop()
        if self.mqtt.connected.is_set():
            # A clean stop says offline itself: the broker sends the will only on a lost link.
            info = self._publish(self.topics.state, self._state_payload("offline"), retain=True)
            info.wait_for_publish(2.0)
        self.mqtt.stop()
        if self._stop_prometheus is not None:
            self._stop_prometheus()
        self.registry.close_all()

    # --- MQTT glue -----------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        return self.mqtt.publish(topic, payload, qos=qos, retain=retain)

    def _publish_result(
        self, topic: str, payload: bytes, correlation: bytes | None, user: Any
    ) -> None:
        self.mqtt.publish(topic, payload, qos=1, correlation_data=correlation, user_properties=user)

    def _on_desired(self, inbound: Inbound) -> None:
        self.reconciler.offer(inbound.payload)

    def _on_connected(self) -> None:
        # Birth and the retained reported state, on every (re)connect.
        self._publish(self.topics.state, self._state_payload("online"), retain=True)
        self.publish_reported()

    def _state_payload(self, state: str) -> bytes:
        return _json.encode(
            {
                "state": state,
                "agent_version": __version__,
                "session_id": self.session_id,
                "started_at": self.started_at,
            }
        )

    def reported(self) -> dict[str, Any]:
        return {
            "device_id": self.cfg.device_id,
            "agent_version": __version__,
            "revision": self.reconciler.applied_revision,
            "models": self.reconciler.statuses(),
            "last_error": self.reconciler.last_error,
            "hardware": self.hardware.summary(),
            "updated_at": _now_iso(),
        }

    def publish_reported(self) -> None:
        # Offline, a queued copy would be resent after the fresh one that every reconnect
        # publishes, and the stale one would stay retained. So only publish while connected.
        if not self.mqtt.connected.is_set():
            return
        # Build and publish under one lock: a snapshot taken earlier never goes out later.
        with self._reported_lock:
            self._publish(self.topics.reported, _json.encode(self.reported()), retain=True)

    def emit_event(self, kind: str, **fields: Any) -> None:
        event = {"ts": _now_iso(), "type": kind, "device_id": self.cfg.device_id}
        event.update({k: v for k, v in fields.items() if v is not None})
        log.info("event %s %s", kind, fields)
        self._publish(self.topics.events, _json.encode(event))
