"""The agent's MQTT v5 session: one network thread, persistent session, birth and will.

paho runs every callback on the network thread. Handlers registered here must
only hand work off (a bounded queue's put_nowait); each is wrapped so that an
exception is logged and never escapes into paho.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.brokerurl import parse_broker_url
from agent.config import BrokerConfig
from agent.tls import describe_connect_error, security_from_config

log = logging.getLogger(__name__)

MQTT_MAX_PACKET = 268_435_455  # the protocol's own limit when the broker names none


@dataclass(frozen=True)
class Inbound:
    """What a handler gets: the message, its v5 properties and when it arrived."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None
    correlation_data: bytes | None
    user_properties: tuple[tuple[str, str], ...]
    expiry_s: int | None
    received: float  # time.monotonic()
    received_wall: float = 0.0  # time.time(), for deadlines that outlive the process
    mid: int = 0  # for the manual PUBACK once the job is journaled
    # Set when the MQTT packet could not be read in full (agent/mqtt_wire.py): why. The
    # fields above hold what could be read; a job route answers it INVALID_ARGUMENT.
    unreadable: str | None = None

    def user_property(self, name: str) -> str | None:
        for key, value in self.user_properties:
            if key == name:
                return value
        return None


Handler = Callable[[Inbound], None]


@dataclass(frozen=True)
class Route:
    subscription: str  # what we subscribe to (may be $share/...)
    qos: int
    handler: Handler
    # Also hand over messages whose packet could not be read in full (Inbound.unreadable
    # says why); other routes never see them (they are acknowledged and logged).
    takes_unreadable: bool = False

    @property
    def match_filter(self) -> str:
        # Messages of a shared subscription arrive on the plain topic.
        if self.subscription.startswith("$share/"):
            return self.subscription.split("/", 2)[2]
        return self.subscription


@dataclass(frozen=True)
class Retained:
    topic: str
    payload: bytes


def new_properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Full-jitter exponential backoff: a random delay in [low, min(high, low * 2**attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 20)))
    return random.uniform(low, max(low, ceiling))  # noqa: S311 - jitter, not crypto


class MqttSession:
    """Owns the paho client and its network thread; thread-safe `publish`."""

    def __init__(
        self,
        client_id: str,
        cfg: BrokerConfig,
        routes: Sequence[Route],
        will: Retained,
        on_connected: Callable[[], None],
        on_published: Callable[[int, bool], None] | None = None,
    ) -> None:
        self._cfg = cfg
        self._on_published_cb = on_published
        # The broker's CONNACK may lower this (MQTT v5 Maximum Packet Size).
        self.max_packet_size = MQTT_MAX_PACKET
        self._addr = parse_broker_url(cfg.url)
        self._routes = tuple(routes)
        self._on_connected_cb = on_connected
        self._stop = threading.Event()
        self.connected = threading.Event()
        # Set on SUBACK: the session is up and hears its topics (READY=1 waits for this).
        self.subscribed = threading.Event()
        # When the network thread last went round its loop: the watchdog's liveness probe.
        self.loop_beat = time.monotonic()
        self.connect_count = 0
        self._thread: threading.Thread | None = None

        # manual_ack: a QoS 1 job is acknowledged only once it is in the journal, so a
        # crash before that makes the broker deliver it again.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.will_set(will.topic, will.payload, qos=1, retain=True)
        client.connect_timeout = cfg.connect_timeout_s
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)
        # TLS, client certificate, username and password (agent/tls.py); never logged.
        security = security_from_config(cfg)
        security.apply(client, self._addr)
        log.info("broker %s: %s", self._addr, security.describe(self._addr))
        for warning in security.warnings(self._addr):
            log.warning("broker %s: %s", self._addr, warning)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        # A registered write callback makes publish() from worker threads only queue
        # the packet and wake our loop, instead of writing the socket concurrently.
        client.on_socket_register_write = self._on_register_write
        self._client = client

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.loop_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._client.disconnect()
        except Exception:
            log.debug("disconnect failed", exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        attempt = 0
        first = True
        props = new_properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._cfg.session_expiry_s
        while not self._stop.is_set():
            try:
                if first:
                    self._client.connect(
                        self._addr.host,
                        self._addr.port,
                        keepalive=self._cfg.keepalive_s,
                        clean_start=False,
                        properties=props,
                    )
                    first = False
                else:
                    self._client.reconnect()
            except (OSError, mqtt.WebsocketConnectionError) as exc:
                delay = backoff_delay(attempt, self._cfg.reconnect_min_s, self._cfg.reconnect_max_s)
                log.warning("broker %s unreachable (%s); retrying in %.1fs", self._addr,
                            describe_connect_error(exc), delay)
                attempt += 1
                self._pause(delay)
                continue
            connects_before = self.connect_count
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.5)
                self.loop_beat = time.monotonic()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            # A link the broker accepted starts the backoff over. (`connected` cannot tell:
            # on_disconnect has already cleared it when the loop gives up.)
            if self.connect_count != connects_before:
                attempt = 0
            self.connected.clear()
            self.subscribed.clear()
            if self._stop.is_set():
                # Let the DISCONNECT packet go out.
                for _ in range(4):
                    if self._client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                return
            delay = backoff_delay(attempt, self._cfg.reconnect_min_s, self._cfg.reconnect_max_s)
            attempt += 1
            log.warning("connection to %s lost; reconnecting in %.1fs", self._addr, delay)
            self._pause(delay)

    def _pause(self, delay: float) -> None:
        """Wait out a reconnect delay in short steps, so the loop beat stays fresh."""
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            self.loop_beat = time.monotonic()
            left = deadline - self.loop_beat
            if left <= 0:
                return
            self._stop.wait(min(left, 1.0))

    def loop_age(self) -> float:
        """Seconds since the network thread last went round its loop; inf once it has died."""
        if self._thread is None or not self._thread.is_alive():
            return float("inf")
        return time.monotonic() - self.loop_beat

    # --- paho callbacks (network thread: never block, never raise) -------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Small QoS 1 packets otherwise wait on delayed ACKs (tens of ms each).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            log.debug("could not set TCP_NODELAY", exc_info=True)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        return None

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self._addr, reason_code)
            return
        try:
            self.connect_count += 1
            advertised = getattr(properties, "MaximumPacketSize", None) if properties else None
            self.max_packet_size = int(advertised) if advertised else MQTT_MAX_PACKET
            subs = [(r.subscription, SubscribeOptions(qos=r.qos)) for r in self._routes]
            # Always re-subscribe: the broker may have lost our session.
            if subs:
                client.subscribe(subs)
            self.connected.set()
            log.info(
                "connected to %s (session present: %s)", self._addr, flags.session_present
            )
            self._on_connected_cb()
        except Exception:
            log.exception("on_connect handler failed")

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        try:
            for route, code in zip(self._routes, reason_codes, strict=False):
                if code.is_failure:
                    log.error("broker %s refused the subscription %s: %s", self._addr,
                              route.subscription, code)
            self.subscribed.set()
        except Exception:
            log.exception("on_subscribe handler failed")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stop.is_set():
            log.warning("disconnected from %s: %s", self._addr, reason_code)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._on_published_cb is None:
            return
        try:
            self._on_published_cb(mid, bool(reason_code.is_failure))
        except Exception:
            log.exception("on_publish handler failed")

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (any thread)."""
        if qos > 0:
            self._client.ack(mid, qos)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            inbound = _to_inbound(msg)
            for route in self._routes:
                if mqtt.topic_matches_sub(route.match_filter, inbound.topic):
                    route.handler(inbound)
                    return
            log.warning("message on unhandled topic %s dropped", inbound.topic)
            self.ack(msg.mid, msg.qos)
        except Exception:
            log.exception("handler for %s failed", msg.topic)
            self.ack(msg.mid, msg.qos)

    # --- publishing (any thread) -----------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> mqtt.MQTTMessageInfo:
        props: Properties | None = None
        if correlation_data is not None or user_properties:
            props = PackedPublishProperties(correlation_data, user_properties)
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)


class PackedPublishProperties(Properties):
    """A PUBLISH's Correlation Data and User Properties, encoded once here. paho's own
    Properties looks each name up and validates it on every assignment and again on
    pack(): about 80 us for an answer's two properties, on every answer (measured); this
    encodes the same bytes in a few. paho only calls pack() on it (and str() for its debug
    log); it keeps the object to send again after a reconnect."""

    def __init__(self, correlation_data: bytes | None,
                 user_properties: Sequence[tuple[str, str]] = (), *,
                 response_topic: str | None = None, expiry_s: int | None = None) -> None:
        # Not Properties.__init__: nothing reads its tables from this object. Properties in
        # the order of their identifiers, as paho writes them.
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        body = bytearray()
        if expiry_s is not None:
            body += b"\x02" + int(expiry_s).to_bytes(4, "big")
        if response_topic is not None:
            body += b"\x08" + _u16_prefixed(response_topic.encode())
        if correlation_data is not None:
            body += b"\x09" + _u16_prefixed(bytes(correlation_data))
        for key, value in user_properties:
            body += b"\x26" + _u16_prefixed(key.encode()) + _u16_prefixed(value.encode())
        object.__setattr__(self, "_packed", _varint(len(body)) + bytes(body))
        object.__setattr__(self, "_shown", (response_topic, correlation_data, tuple(user_properties)))

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed

    def __str__(self) -> str:
        topic, corr, user = object.__getattribute__(self, "_shown")
        return f"[ResponseTopic : {topic!r}, CorrelationData : {corr!r}, UserProperty : {list(user)!r}]"

    __repr__ = __str__


def _u16_prefixed(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"an MQTT property of {len(data)} bytes is over 65535")
    return len(data).to_bytes(2, "big") + data


def _varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _to_inbound(msg: mqtt.MQTTMessage) -> Inbound:
    props = getattr(msg, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props else None
    correlation = getattr(props, "CorrelationData", None) if props else None
    user = getattr(props, "UserProperty", None) if props else None
    expiry = getattr(props, "MessageExpiryInterval", None) if props else None
    return Inbound(
        topic=msg.topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        response_topic=response_topic,
        correlation_data=bytes(correlation) if correlation is not None else None,
        user_properties=tuple((str(k), str(v)) for k, v in (user or ())),
        expiry_s=int(expiry) if expiry is not None else None,
        received=time.monotonic(),
        received_wall=time.time(),
        mid=msg.mid,
    )
