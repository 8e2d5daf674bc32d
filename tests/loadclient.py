"""A job client for fault tests: many jobs in flight, retries, and an exact tally.

It is a plain paho client with a persistent session, as a device developer on a flaky link
would write one: each job keeps its id and correlation data, and a job without an answer
after `retry_after_s` is published again. The agent answers a repeated id from its
journal, so a retry never runs a job twice. Every answer that arrives is counted, so the
test can tell the final answer per job from the duplicates QoS 1 may add.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.topics import Topics


@dataclass
class Tally:
    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    publishes: int = 0
    resends: int = 0

    def final(self) -> dict[str, dict[str, Any]]:
        return {k: v[0] for k, v in self.answers.items()}

    def duplicates(self) -> int:
        return sum(len(v) - 1 for v in self.answers.values())


class LoadClient:
    def __init__(self, url: str, device: str, client_id: str = "loadclient") -> None:
        self.addr = parse_broker_url(url)
        self.jobs_topic = Topics("edge/v1", device).jobs
        self.reply_topic = f"edge/v1/reply/{client_id}/r"
        self.tally = Tally()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        c.connect(self.addr.host, self.addr.port, keepalive=5, clean_start=False, properties=props)
        self.client = c
        c.loop_start()

    def _on_connect(self, client: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self.reply_topic, qos=1)

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        corr = getattr(msg.properties, "CorrelationData", None)
        key = corr.decode() if corr else str(body.get("id"))
        with self._changed:
            self.tally.answers.setdefault(key, []).append(body)
            self._changed.notify_all()

    def publish(self, job_id: str, body: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = job_id.encode()
        self.client.publish(self.jobs_topic, body, qos=1, properties=props)

    def run(
        self,
        bodies: dict[str, bytes],
        window: int = 64,
        rate_per_s: float = 100.0,
        retry_after_s: float = 4.0,
        timeout_s: float = 120.0,
        on_progress: Callable[[int], None] | None = None,
    ) -> Tally:
        """Send every job, at most `window` unanswered at once, until each has an answer."""
        waiting = list(bodies)
        sent_at: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        gap = 1.0 / rate_per_s
        while time.monotonic() < deadline:
            with self._lock:
                done = set(self.tally.answers)
            for key in [k for k in sent_at if k in done]:
                del sent_at[key]
            if not waiting and not sent_at:
                return self.tally
            now = time.monotonic()
            for key, t in list(sent_at.items()):
                if now - t > retry_after_s:
                    self.publish(key, bodies[key])
                    sent_at[key] = now
                    self.tally.resends += 1
            if waiting and len(sent_at) < window:
                key = waiting.pop(0)
                self.publish(key, bodies[key])
                self.tally.publishes += 1
                sent_at[key] = time.monotonic()
                if on_progress is not None:
                    on_progress(self.tally.publishes)
                time.sleep(gap)
            else:
                with self._changed:
                    self._changed.wait(0.05)
        missing = len(waiting) + len(sent_at)
        raise AssertionError(f"{missing} job(s) never answered within {timeout_s}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
