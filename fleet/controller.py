"""The fleet controller: every device's `state`, `reported`, `telemetry` and `events`,
kept in the registry.

Two parts, as STYLE asks: `Ingestor` turns one message into registry writes (pure logic,
tested without a broker), and `Controller` is the MQTT session that feeds it.

The session is persistent (fixed client id, clean start off, session expiry) and
acknowledges each QoS 1 message only after its registry write committed (paho's
`manual_ack`): events published while the controller restarts wait in the broker, and a
controller killed mid-write gets the message again. On every (re)connect it subscribes
again, so the broker re-sends the retained `state` and `reported` of every device and the
registry catches up with whatever changed meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeinfer.contract import lenient
from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.documents import Hardware
from edgeinfer.contract.topics import DEVICE_ID_RE, device_wildcard
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.registry import Registry, RegistryError, RegistryUnavailable, normalize_ts, utc_now
from edgeinfer.fleet.reports import (
    device_state,
    models_of,
    parse_json_object,
    read_reported,
    read_state,
)

log = logging.getLogger(__name__)

LEAVES = ("state", "reported", "telemetry", "events")
_QOS = {"state": 1, "reported": 1, "telemetry": 0, "events": 1}
# QoS 1 messages the broker may have in flight to us (MQTT v5 Receive Maximum): with
# acks sent only after the write, this bounds the queue for everything but telemetry.
RECEIVE_MAXIMUM = 1000
# Telemetry (QoS 0, superseded by the next one) is dropped beyond this backlog.
MAX_PENDING_TELEMETRY = 2000


def summarize_hardware(hw: Any) -> dict[str, Any]:
    """The part of `reported.hardware` (as decoded JSON) an operator filters and sorts by;
    {} when the agent sent no hardware object."""
    summary = lenient.convert(hw, Hardware)
    if summary is None:
        return {}
    return {
        "cpu_model": summary.cpu.model,
        "cores": summary.cpu.cores_logical,
        "memory_mb": summary.memory_mb,
        "gpus": [str(g.name) for g in summary.nvidia_gpus],
        "onnxruntime_providers": list(summary.onnxruntime.providers),
        "openvino_devices": sorted(summary.openvino.devices),
    }


@dataclass
class Counters:
    ingested: int = 0
    ignored: int = 0  # not ours, malformed, empty
    dropped_telemetry: int = 0
    write_retries: int = 0


class Ingestor:
    """Writes one device message into the registry. Tolerates any payload."""

    def __init__(self, registry: Registry, prefix: str) -> None:
        self.registry = registry
        self.prefix = prefix.strip("/")
        self._head = f"{self.prefix}/dev/"
        # Built once, not per message (STYLE).
        self._routes: dict[str, Callable[[str, bytes, bool, str], bool]] = {
            "state": self._state,
            "reported": self._reported,
            "telemetry": self._telemetry,
            "events": self._event,
        }

    def filters(self) -> list[tuple[str, int]]:
        return [(device_wildcard(self.prefix, leaf), _QOS[leaf]) for leaf in LEAVES]

    def route(self, topic: str) -> tuple[str, str] | None:
        """(device id, leaf) of a topic we handle, else None."""
        if not topic.startswith(self._head):
            return None
        parts = topic[len(self._head):].split("/")
        if len(parts) != 2 or parts[1] not in self._routes or not DEVICE_ID_RE.match(parts[0]):
            return None
        return parts[0], parts[1]

    def handle(self, topic: str, payload: bytes, *, retained: bool = False,
               received_at: str | None = None) -> bool:
        """True when the message changed the registry; RegistryUnavailable propagates."""
        routed = self.route(topic)
        if routed is None or not payload:
            # An empty retained payload is a deletion on the broker: the registry keeps
            # the device (with its labels) until an operator removes it.
            return False
        device, leaf = routed
        return self._routes[leaf](device, payload, retained, received_at or utc_now())

    def _seen(self, retained: bool, stamp: Any, now: str) -> str | None:
        # A retained message may be days old: its own timestamp, not now, is when the
        # device was last heard (and none at all rather than a wrong one).
        if not retained:
            return now
        return normalize_ts(stamp)

    def _state(self, device: str, payload: bytes, retained: bool, now: str) -> bool:
        doc = read_state(payload)  # None for a bare word will
        agent_version = doc.agent_version if doc else None
        session_id = doc.session_id if doc else None
        started_at = doc.started_at if doc else None
        self.registry.record_state(
            device, state=device_state(payload),
            agent_version=agent_version or None,
            session_id=session_id or None,
            started_at=normalize_ts(started_at),
            seen_at=self._seen(retained, started_at, now),
        )
        return True

    def _reported(self, device: str, payload: bytes, retained: bool, now: str) -> bool:
        doc = read_reported(payload)
        raw = parse_json_object(payload)
        if doc is None or raw is None:
            log.warning("reported of %s is not a JSON object: ignored", device)
            return False
        self.registry.record_reported(
            device,
            agent_version=doc.agent_version or None,
            revision=doc.revision,
            # Kept as the agent sent them: keys this fleet does not know yet included.
            models=models_of(raw),
            last_error=doc.last_error or None,
            hardware=summarize_hardware(raw.get("hardware")),
            reported_at=normalize_ts(doc.updated_at),
            seen_at=self._seen(retained, doc.updated_at, now),
        )
        return True

    def _telemetry(self, device: str, payload: bytes, retained: bool, now: str) -> bool:
        doc = parse_json_object(payload)
        if doc is None:
            return False
        self.registry.record_telemetry(device, doc, now, live=not retained)
        return True

    def _event(self, device: str, payload: bytes, _retained: bool, now: str) -> bool:
        doc = parse_json_object(payload)
        if doc is None:
            return False
        self.registry.add_event(device, doc, now)
        return True


@dataclass(frozen=True)
class _Item:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    retained: bool
    received_at: str


class Controller:
    """The controller's MQTT session feeding an `Ingestor` from one writer thread."""

    def __init__(
        self,
        registry: Registry,
        broker_url: str,
        *,
        prefix: str,
        client_id: str = "edge-fleet-controller",
        security: TransportSecurity | None = None,
        session_expiry_s: int = 86_400,
        keepalive_s: int = 30,
    ) -> None:
        self.registry = registry
        self.ingestor = Ingestor(registry, prefix)
        self.address = parse_broker_url(broker_url)  # ValueError on a bad URL
        self.url = str(self.address)
        self.client_id = client_id
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.counters = Counters()
        self.connected = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        (security or TransportSecurity()).apply(self.client, self.address)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._generation = 0  # bumped per connection: acks never cross connections
        self._pending = 0
        self._pending_telemetry = 0
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Controller:
        """Connect in the background (retrying until the broker answers) and ingest."""
        self._writer = threading.Thread(target=self._write_loop, name="registry-writer",
                                        daemon=True)
        self._writer.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(self.address.host, self.address.port, self.keepalive_s,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        self._queue.put(None)
        if self._writer is not None:
            self._writer.join(10.0)
            self._writer = None

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """True once every message received so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "broker": self.url,
            "client_id": self.client_id,
            "connected": self.connected.is_set(),
            "registry": self.registry.url,
            "pending": self._pending,
            "ingested": self.counters.ingested,
            "ignored": self.counters.ignored,
            "dropped_telemetry": self.counters.dropped_telemetry,
            "write_retries": self.counters.write_retries,
        }

    # -- paho callbacks (network thread: never block) -------------------------------

    def _on_connect(self, client: paho.Client, _userdata: Any, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, _properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("broker %s refused the controller: %s", self.url, reason_code)
            return
        self._generation += 1
        log.info("controller connected to %s (session present: %s)", self.url,
                 flags.session_present)
        # Always subscribe again, even with a kept session: the broker then re-sends
        # every retained state/reported, which refreshes the registry.
        result, mid = client.subscribe(self.ingestor.filters())
        if mid is None:
            log.error("cannot subscribe on %s: %s", self.url, paho.error_string(result))

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, _mid: int,
                      reason_codes: list[ReasonCode], _properties: Properties | None) -> None:
        # `connected` means ingesting: set once the broker has granted the subscriptions,
        # so nothing published after it is missed.
        if any(rc.is_failure for rc in reason_codes):
            log.error("broker %s refused the controller's subscriptions: %s", self.url,
                      [str(rc) for rc in reason_codes])
            return
        self.connected.set()

    def _on_disconnect(self, _client: paho.Client, _userdata: Any,
                       _flags: paho.DisconnectFlags, reason_code: ReasonCode,
                       _properties: Properties | None) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("controller lost %s: %s (reconnecting)", self.url, reason_code)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            telemetry = msg.topic.endswith("/telemetry")
            with self._idle:
                if telemetry and msg.qos == 0:
                    if self._pending_telemetry >= MAX_PENDING_TELEMETRY:
                        self.counters.dropped_telemetry += 1
                        return
                    self._pending_telemetry += 1
                self._pending += 1
            self._queue.put(_Item(self._generation, msg.mid, msg.qos, msg.topic,
                                  bytes(msg.payload), bool(msg.retain), utc_now()))
        except Exception:
            log.exception("cannot queue a message to %s", msg.topic)

    # -- writer thread --------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(item)
            finally:
                with self._idle:
                    self._pending -= 1
                    if item.qos == 0 and item.topic.endswith("/telemetry"):
                        self._pending_telemetry -= 1
                    self._idle.notify_all()

    def _write(self, item: _Item) -> None:
        delay = 0.1
        while True:
            try:
                changed = self.ingestor.handle(item.topic, item.payload, retained=item.retained,
                                               received_at=item.received_at)
                break
            except RegistryUnavailable as exc:
                if self._stopping.is_set():
                    return  # not acknowledged: the broker sends it again next time
                self.counters.write_retries += 1
                log.warning("registry unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except (RegistryError, ValueError, TypeError):
                log.exception("message to %s not stored", item.topic)
                changed = False
                break
        if changed:
            self.counters.ingested += 1
        else:
            self.counters.ignored += 1
        if item.qos > 0 and item.generation == self._generation:
            # In order, one thread: MQTT wants PUBACKs in the order of the PUBLISHes.
            self.client.ack(item.mid, item.qos)
