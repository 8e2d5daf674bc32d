"""A connected MQTT v5 session for the fleet tools, and `read_retained`.

paho runs every callback on its network thread. `Connection` keeps that thread free:
handlers are wrapped so an exception is logged instead of killing the loop, and
acknowledgements (PUBACK, SUBACK) resolve `Future`s that the caller waits on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.topics import has_wildcard
from edgeinfer.contract.transport import TransportError, TransportSecurity, describe_connect_error

log = logging.getLogger(__name__)

MessageHandler = Callable[[paho.MQTTMessage], None]


class BrokerError(ConnectionError):
    """The broker cannot be reached, or refused a connection, publish or subscribe."""


def new_client_id(stem: str = "fleet") -> str:
    # Fits the device-id alphabet, so it can also be a topic level (reply topics).
    return f"{stem}-{uuid.uuid4().hex[:12]}"


class _Acks:
    """Futures keyed by packet id, resolved by the network thread.

    The acknowledgement can arrive before the caller learns the packet id from paho
    (the network thread is fast), so an early ack is parked until the caller asks.
    Only our own lock is taken here, never while calling into paho: no lock-order
    inversion with paho's internal mutexes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Future[Any]] = {}
        self._early: dict[int, Any] = {}

    def expect(self, mid: int) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            if mid in self._early:
                value = self._early.pop(mid)
            else:
                self._waiting[mid] = fut
                return fut
        _settle(fut, value)
        return fut

    def resolve(self, mid: int, value: Any) -> None:
        with self._lock:
            fut = self._waiting.pop(mid, None)
            if fut is None:
                self._early[mid] = value
                return
        _settle(fut, value)

    def fail_all(self, exc: BaseException) -> None:
        with self._lock:
            waiting = list(self._waiting.values())
            self._waiting.clear()
            self._early.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)


def _settle(fut: Future[Any], value: Any) -> None:
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


def _set_nodelay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    # Jobs and results are small messages where Nagle's delay would dominate latency.
    # A TLS or websocket wrapper may not expose setsockopt: then latency is its business.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Connection:
    """One MQTT v5 session: publish and subscribe with acknowledgements as futures.

    Use `connect()` to make one. Subscriptions are remembered and renewed after an
    automatic reconnect that did not keep the session.
    """

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        keepalive: int = 30,
        *,
        security: TransportSecurity | None = None,
    ) -> None:
        self.address = parse_broker_url(url)
        self.url = str(self.address)
        self.client_id = client_id or new_client_id()
        self.keepalive = keepalive
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
        )
        # mqtts:// verifies the broker (system CA store unless a CA file is given).
        (security or TransportSecurity()).apply(self.client, self.address)
        self.client.on_socket_open = _set_nodelay
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self._pub_acks = _Acks()
        self._sub_acks = _Acks()
        self._subs_lock = threading.Lock()
        self._subs: dict[str, int] = {}  # filter -> qos, renewed on reconnect
        self._connack: Future[None] = Future()
        self._closed = False
        # The broker's Maximum Packet Size (CONNACK), when it announces one. A PUBLISH
        # over it is refused here: sent, the broker would end the connection (0x95 Packet
        # too large) and paho would send it again after every reconnect, while the caller
        # only ever saw a timeout.
        self.max_packet_size: int | None = None

    # -- lifecycle ---------------------------------------------------------------

    def open(self, timeout_s: float) -> None:
        where = f"cannot reach broker {self.url}"
        deadline = time.monotonic() + timeout_s
        self.client.connect_timeout = max(timeout_s, 0.1)
        try:
            self.client.connect(self.address.host, self.address.port, self.keepalive)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"{where}: {describe_connect_error(exc)}") from None
        self.client.loop_start()
        try:
            self._connack.result(max(deadline - time.monotonic(), 0.1))
        except TimeoutError:
            self._stop()
            raise BrokerError(f"{where}: no answer to CONNECT within {timeout_s:g}s") from None
        except BrokerError as exc:
            self._stop()
            raise BrokerError(f"{where}: {exc}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop()
        closed = BrokerError(f"connection to {self.url} closed")
        self._pub_acks.fail_all(closed)
        self._sub_acks.fail_all(closed)

    def _stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- operations --------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> Future[None]:
        """Resolves on PUBACK (QoS 1) or once written (QoS 0); fails if refused."""
        limit = self.max_packet_size
        if limit is not None:
            size = publish_packet_size(topic, len(payload), qos, properties)
            if size > limit:
                too_large: Future[None] = Future()
                too_large.set_exception(BrokerError(
                    f"cannot publish to {topic}: the message is {size} bytes, over the "
                    f"broker's Maximum Packet Size of {limit} bytes (max_packet_size in its "
                    "config); send less per message"))
                return too_large
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        fut: Future[None] = self._pub_acks.expect(info.mid)
        # NO_CONN still queues a QoS>0 message for the next connection: not a failure.
        # A QoS 0 message is dropped then, and no callback would ever resolve it.
        queued = info.rc == paho.MQTT_ERR_NO_CONN and qos > 0
        if info.rc != paho.MQTT_ERR_SUCCESS and not queued:
            self._pub_acks.resolve(info.mid, None)  # drop the slot
            failed: Future[None] = Future()
            failed.set_exception(
                BrokerError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
            )
            return failed
        return fut

    def subscribe(
        self, topic_filter: str, handler: MessageHandler, *, qos: int = 1, timeout_s: float = 5.0
    ) -> None:
        """Subscribe and wait for the SUBACK; `handler` runs on the network thread.

        One handler per filter: subscribing to the same filter again replaces it.
        """
        self.client.message_callback_add(topic_filter, _guarded(topic_filter, handler))
        with self._subs_lock:
            self._subs[topic_filter] = qos
        rc, mid = self.client.subscribe(topic_filter, qos=qos)
        if mid is None:
            self._forget(topic_filter)
            raise BrokerError(f"cannot subscribe to {topic_filter}: {paho.error_string(rc)}")
        try:
            self._sub_acks.expect(mid).result(timeout_s)
        except TimeoutError:
            raise BrokerError(
                f"broker {self.url} did not acknowledge the subscription to {topic_filter}"
            ) from None
        except BrokerError as exc:
            self._forget(topic_filter)
            raise BrokerError(f"cannot subscribe to {topic_filter}: {exc}") from None

    def unsubscribe(self, topic_filter: str, *, timeout_s: float = 5.0) -> None:
        self._forget(topic_filter)
        _rc, mid = self.client.unsubscribe(topic_filter)
        if mid is None:  # not connected: the broker forgets the subscription anyway
            return
        # An unsubscribe that is not acknowledged in time does no harm: no wait error.
        with contextlib.suppress(TimeoutError, BrokerError):
            self._sub_acks.expect(mid).result(timeout_s)

    def _forget(self, topic_filter: str) -> None:
        with self._subs_lock:
            self._subs.pop(topic_filter, None)
        self.client.message_callback_remove(topic_filter)

    def read_retained(
        self, topics: str | Iterable[str], *, quiet_s: float = 0.3, timeout_s: float = 3.0
    ) -> dict[str, bytes]:
        """Retained messages of `topics` (filters allowed), gathered until quiet.

        Returns as soon as every exact topic has answered; otherwise once no message
        came for `quiet_s`, or at `timeout_s` at the latest. A live update seen
        meanwhile replaces the retained value; an empty payload is a deletion.
        """
        filters = [topics] if isinstance(topics, str) else list(topics)
        exact = {t for t in filters if not has_wildcard(t)}
        got: dict[str, bytes] = {}
        cond = threading.Condition()
        last = [time.monotonic()]

        def on_message(msg: paho.MQTTMessage) -> None:
            with cond:
                if msg.payload:
                    got[msg.topic] = bytes(msg.payload)
                else:
                    got.pop(msg.topic, None)
                last[0] = time.monotonic()
                cond.notify_all()

        deadline = time.monotonic() + timeout_s
        try:
            for f in filters:
                self.subscribe(f, on_message, timeout_s=max(deadline - time.monotonic(), 0.1))
            with cond:
                last[0] = max(last[0], time.monotonic())
                while True:
                    now = time.monotonic()
                    if exact and len(exact) == len(filters) and exact <= got.keys():
                        break
                    wait = min(last[0] + quiet_s, deadline) - now
                    if wait <= 0:
                        break
                    cond.wait(wait)
                return dict(got)
        finally:
            for f in filters:
                with contextlib.suppress(BrokerError):
                    self.unsubscribe(f, timeout_s=1.0)

    # -- paho callbacks (network thread: never block) ----------------------------

    def _on_connect(
        self,
        _client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.url, reason_code)
            if not self._connack.done():
                self._connack.set_exception(
                    BrokerError(f"broker refused the connection: {reason_code}")
                )
            return
        limit = getattr(_properties, "MaximumPacketSize", None)
        self.max_packet_size = limit if isinstance(limit, int) and limit > 0 else None
        if not self._connack.done():
            self._connack.set_result(None)
            return
        log.info("reconnected to %s", self.url)
        if flags.session_present:
            return
        with self._subs_lock:
            subs = list(self._subs.items())
        for topic_filter, qos in subs:
            rc, mid = self.client.subscribe(topic_filter, qos=qos)
            if mid is None:
                log.error("could not renew the subscription to %s: %s", topic_filter,
                          paho.error_string(rc))
                continue
            self._sub_acks.expect(mid).add_done_callback(_log_failure(topic_filter))

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if not self._connack.done():
            # E.g. a TLS 1.3 broker rejecting our client certificate after the handshake.
            hint = ("; the broker may have rejected the client certificate (missing, revoked "
                    "or from another CA)" if self.address.tls else "")
            self._connack.set_exception(
                BrokerError(f"connection closed before CONNACK ({reason_code}){hint}")
            )
            return
        if not self._closed:
            log.warning("lost connection to %s: %s", self.url, reason_code)

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._pub_acks.resolve(mid, BrokerError(f"broker refused the publish: {reason_code}"))
        else:
            self._pub_acks.resolve(mid, None)

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        bad = [rc for rc in reason_codes if rc.is_failure]
        self._sub_acks.resolve(mid, BrokerError(str(bad[0])) if bad else None)

    def _on_unsubscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        _reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self._sub_acks.resolve(mid, None)


def publish_packet_size(topic: str, payload_len: int, qos: int,
                        properties: Properties | None) -> int:
    """The bytes of a PUBLISH packet as MQTT v5 frames it (section 3.3): fixed header,
    topic, packet id (QoS > 0), properties (with their length) and payload."""
    packed = properties.pack() if properties is not None else b"\x00"  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + len(packed) + payload_len
    length_bytes = 1
    while remaining >= 128 ** length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def _guarded(topic_filter: str, handler: MessageHandler) -> Callable[..., None]:
    # paho re-raises callback exceptions out of its network thread: log them instead.
    def on_message(_client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            handler(msg)
        except Exception:
            log.exception("handler for %s failed on a message to %s", topic_filter, msg.topic)

    return on_message


def _log_failure(topic_filter: str) -> Callable[[Future[Any]], None]:
    def done(fut: Future[Any]) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error("could not renew the subscription to %s: %s", topic_filter, exc)

    return done


def connect(
    url: str,
    *,
    client_id: str | None = None,
    timeout_s: float = 5.0,
    security: TransportSecurity | None = None,
) -> Connection:
    """A connected session; raises BrokerError("cannot reach broker mqtt://...: <reason>")."""
    try:
        conn = Connection(url, client_id, security=security)
    except (ValueError, TransportError) as exc:  # a malformed URL, unusable TLS files
        raise BrokerError(str(exc)) from None
    conn.open(timeout_s)
    return conn


def read_retained(
    url: str,
    topics: str | Iterable[str],
    quiet_s: float = 0.3,
    timeout_s: float = 3.0,
    *,
    security: TransportSecurity | None = None,
) -> dict[str, bytes]:
    """Topic -> payload of the retained messages matching `topics` (filters allowed)."""
    with connect(url, timeout_s=timeout_s, security=security) as conn:
        return conn.read_retained(topics, quiet_s=quiet_s, timeout_s=timeout_s)
