"""The agent's MQTT v5 session on the `mqtt5` codec: one I/O thread, persistent session.

Threads. One I/O thread owns the socket: it connects, reads and parses every packet
(mqtt5, in Rust), hands each PUBLISH to its route's handler, answers PINGs and PUBACKs,
and writes what others left in the outgoing buffer. It waits in a `selectors` loop with a
wake-up socketpair. Not asyncio: every other part of the agent is threads (workers, the
outbox, the intake), so a publish from them would go through `call_soon_threadsafe`, a
self-pipe write and a coroutine per message; here a publish from any thread appends its
bytes to the outgoing buffer under `_lock` and, when nothing is queued before it, writes
them to the non-blocking socket itself (an answer goes out without a second queue when
the window allows). A partial write leaves the rest for the I/O thread, which it wakes.
`publish()` and `ack()` never block on the network.

`_lock` guards the socket's writes (and, for TLS, its reads too: an SSL object is not safe
for a read and a write at once), the outgoing buffer, the packet ids and the QoS 1
publishes in flight or held. Callbacks (handlers, `on_connected`, `on_published`) run on
the I/O thread and never under `_lock`; each is wrapped so that an exception is logged and
never ends the thread. Handlers must only hand work off (a bounded queue's put_nowait).

Session. CONNECT: clean start off, session expiry, our Receive Maximum, the retained QoS 1
will, user name and password. The broker's CONNACK gives its Receive Maximum (QoS 1
publishes beyond it wait in `_held`), Maximum Packet Size and Server Keep Alive. Every
(re)connect subscribes again. QoS 1 publishes not acknowledged when the link dropped are
sent again with their packet ids: with DUP when the broker kept the session, as new
publishes when it did not (an answer is never lost because a broker forgot its session).
A received QoS 1 message is acknowledged by `ack(mid, qos)` from another thread once it
is journaled; its `mid` carries the connection it came on, so an ack that outlived a
session the broker forgot is not sent on the next one (it could name another message).

Takeover. A second client with our client id (two agents given one device id) takes the
session over; reconnecting at once would take it back, and the two would storm (146
connects each in 30 s, measured before this on mosquitto 2.0.11). So a takeover is named (event
`session_taken_over`, `last_disconnect`) and the next connect waits
`broker.takeover_backoff_s`, doubling on each repeat up to `broker.takeover_backoff_max_s`.
A broker that follows MQTT 5 says so with DISCONNECT 0x8E; mosquitto before 2.0.15 (2.0.11
measured here) closes the old link without a word, so the owner (agent/daemon.py) also
calls `note_twin` when the device's retained state shows another process's session: a link
the broker then closes counts as a takeover too.

A packet the codec refuses is skipped by its fixed-header length and never drops the
link: a QoS 1 PUBLISH is acknowledged (or handed to a route that takes unreadable jobs,
which answers it INVALID_ARGUMENT and acknowledges it once journaled).

A PUBLISH whose payload is over its route's `max_payload` is never held whole: once its
fixed header says it is longer than the smallest such limit, the reader waits for its
variable header (topic and properties, at most PUBLISH_HEAD_MAX bytes), and when the
payload is over the limit it hands the route an Inbound with `oversize` set and an empty
payload, and drops the payload's bytes as they arrive (`_discard`). The link's memory for
it stays under PUBLISH_HEAD_MAX + 2 x READ_CHUNK. Not advertised as our CONNECT's Maximum
Packet Size: a broker drops larger messages for such a client without telling their
sender, where this way the sender is answered.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mqtt5

from edgeinfer.agent.config import BrokerConfig
from edgeinfer.agent.mqtt_wire import (
    PACKET_NAMES,
    PUBLISH_HEAD_MAX,
    FrameError,
    frame_length,
    open_socket,
    publish_head,
    salvage_ack,
    salvage_publish,
)
from edgeinfer.agent.tls import security_from_config
from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.transport import describe_connect_error

log = logging.getLogger(__name__)

MQTT_MAX_PACKET = 268_435_455  # the protocol's own limit when the broker names none
# Our Receive Maximum: QoS 1 jobs the broker may have unacknowledged with us. The intake
# queue holds at least 1,024 (agent/scheduler.py); beyond that the broker keeps them.
RECEIVE_MAXIMUM = 1024
READ_CHUNK = 256 * 1024
LOOP_TICK_S = 0.5  # the loop goes round at least this often (the watchdog's loop beat)
# Why a link ended when the broker closed it without a DISCONNECT.
_CLOSED_BY_BROKER = "the broker closed the connection"

# paho's return codes, for callers that look at `rc`.
RC_SUCCESS = 0
RC_NO_CONN = 4
RC_PAYLOAD_SIZE = 9
RC_QUEUE_SIZE = 15

_QOS = (mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE, mqtt5.QoS.EXACTLY_ONCE)
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_TAKEN_OVER = 0x8E  # DISCONNECT reason code: Session taken over



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
    # Set when the payload was over its route's max_payload: its length in bytes. The
    # payload was dropped unread (`payload` is empty); the fields above are what the
    # variable header said. A job route answers it INVALID_ARGUMENT.
    oversize: int = 0

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
    # A payload over this many bytes is not read: the message reaches the handler with
    # `Inbound.oversize` set when the route takes unreadable ones, else it is acknowledged
    # and dropped (logged). None: no limit beyond MQTT's own.
    max_payload: int | None = None

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


def session_of_mid(mid: int) -> int:
    """The `mid_tag` of the session a received message came in on."""
    return mid >> 48


def takeover_delay(takeovers: int, low: float, high: float) -> float:
    """The wait after the n-th takeover in a row: low, doubling per repeat, capped at high,
    times 1 to 1.5 (jitter, so two twins do not come back together)."""
    base = min(high, low * float(2 ** min(max(takeovers - 1, 0), 20)))
    return min(high, base * random.uniform(1.0, 1.5))  # noqa: S311 - jitter, not crypto


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Full-jitter exponential backoff: a random delay in [low, min(high, low * 2**attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 20)))
    return random.uniform(low, max(low, ceiling))  # noqa: S311 - jitter, not crypto


class PublishInfo:
    """What `publish()` returns: the packet id (`mid`, 0 for QoS 0) and `rc` (0: queued or
    sent), as paho's MQTTMessageInfo; `wait_for_publish` waits for the PUBACK."""

    __slots__ = ("_done", "_event", "mid", "packet", "rc")

    def __init__(self, mid: int, packet: bytes, rc: int = RC_SUCCESS) -> None:
        self.mid = mid
        self.rc = rc
        self.packet = packet  # kept until the PUBACK, to send again after a reconnect
        self._done = False
        self._event: threading.Event | None = None

    def is_published(self) -> bool:
        return self._done

    def wait_for_publish(self, timeout: float | None = None) -> bool:
        if self._done or self.rc != RC_SUCCESS:
            return self._done
        if self._event is None:
            self._event = threading.Event()
            if self._done:  # acknowledged meanwhile
                return True
        return self._event.wait(timeout)

    def _set_done(self) -> None:
        self._done = True
        self.packet = b""
        if self._event is not None:
            self._event.set()


class _Dropped(Exception):
    """The link is gone (or must be dropped); the message says why."""


class _TakenOver(_Dropped):
    """The broker ended the link because another client connected with our client id."""


class MqttSession:
    """Owns the socket and the I/O thread; `publish` and `ack` are thread-safe."""

    def __init__(
        self,
        client_id: str,
        cfg: BrokerConfig,
        routes: Sequence[Route],
        will: Retained | None,
        on_connected: Callable[[], None],
        on_published: Callable[[int, bool], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        mid_tag: int = 0,
    ) -> None:
        """`mid_tag` (0..32767) goes into every received message's `mid` (bits 48 up), so an
        owner of several sessions can send each PUBACK back on the session the message came
        in on (`session_of_mid`)."""
        self._cfg = cfg
        self.client_id = client_id
        self._on_published_cb = on_published
        # What the session saw that operators should hear of beyond the log: a link the
        # broker ended or refused (with its reason code), a packet skipped as unreadable.
        self._on_event_cb = on_event
        self._on_connected_cb = on_connected
        # The broker's CONNACK may lower this (MQTT v5 Maximum Packet Size).
        self.max_packet_size = MQTT_MAX_PACKET
        self._addr = parse_broker_url(cfg.url)
        security = security_from_config(cfg)
        params = security.for_socket(self._addr)  # raises TransportError (a config error)
        self._context = params.context
        log.info("broker %s: %s", self._addr, security.describe(self._addr))
        for warning in security.warnings(self._addr):
            log.warning("broker %s: %s", self._addr, warning)
        self._connect_packet = mqtt5.ConnectPacket(
            client_id,
            username=params.username,
            password=params.password,
            clean_start=False,
            will=None if will is None else mqtt5.Will(
                will.topic, payload=will.payload, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True),
            keep_alive=cfg.keepalive_s,
            session_expiry_interval=cfg.session_expiry_s,
            receive_max=RECEIVE_MAXIMUM,
        ).write()
        self._routes = tuple(routes)
        self._exact, self._wild = _route_table(self._routes)
        # A PUBLISH longer than this (fixed header included) may be over a route's limit;
        # a shorter one cannot be, and is never looked at before the codec reads it.
        limits = [r.max_payload for r in self._routes if r.max_payload is not None]
        self._look_over = min(limits) if limits else None
        self._discard = 0  # I/O thread: bytes of a refused PUBLISH still to drop unread
        self._front_ok = False  # I/O thread: the partial packet at rbuf's front passed
        self._subscribe_filters = [
            mqtt5.TopicFilter(r.subscription, max_qos=_QOS[r.qos]) for r in self._routes
        ]

        self._stop = threading.Event()
        self.connected = threading.Event()
        # Set on SUBACK: the session is up and hears its topics (READY=1 waits for this).
        self.subscribed = threading.Event()
        # When the I/O thread last went round its loop: the watchdog's liveness probe.
        self.loop_beat = time.monotonic()
        self.connect_count = 0
        # Why the last link ended or was refused (a DISCONNECT's reason code and string, a
        # CONNACK refusal, a lost socket), for logs and `doctor`; None before any.
        self.last_disconnect: str | None = None
        self.unreadable = 0  # packets the codec refused (skipped, acknowledged)
        self.takeovers = 0  # links another client with our id took over, in a row
        # Set by note_twin: another process with our client id is about, so a link the
        # broker closes without a DISCONNECT (mosquitto < 2.0.15) counts as taken over.
        self._twin: str | None = None
        self._thread: threading.Thread | None = None

        self._lock = threading.Lock()
        self._sock: socket.socket | None = None  # set while a session is up (after CONNACK)
        self._connecting: socket.socket | None = None
        self._out = bytearray()  # bytes for the socket, in order
        self._write_armed = False  # the I/O thread knows _out holds bytes (no wake needed)
        self._inflight: dict[int, PublishInfo] = {}  # sent QoS 1 publishes, by packet id
        self._held: deque[PublishInfo] = deque()  # QoS 1 publishes waiting for room or a link
        self._used_ids: set[int] = set()  # in flight, held, or our SUBSCRIBE's
        self._next_id = 0
        self._send_quota = 65535  # the broker's Receive Maximum
        self._sub_id = 0
        self._unsub_id = 0
        self._unsubscribed = threading.Event()
        # Connections so far, above the mid_tag (bits 32 up: bits 48 up of a mid); a received
        # message's mid carries its own.
        self._gen = mid_tag << 32
        self._epoch = self._gen  # the connection that last started a new session at the broker
        self._last_write = 0.0
        self._last_read = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.loop_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        connecting = self._connecting
        if connecting is not None:
            with contextlib.suppress(OSError):
                connecting.shutdown(socket.SHUT_RDWR)  # a connect under way ends now
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def unsubscribe_all(self, timeout: float) -> bool:
        """Stop the broker sending us anything new (any thread): UNSUBSCRIBE every route,
        and no SUBSCRIBE on later reconnects. True once the broker confirmed (UNSUBACK)
        within `timeout`. Messages it had already sent or queued for us still come."""
        with self._lock:
            self._subscribe_filters = []
            if self._sock is None or not self._routes:
                return False
            self._unsub_id = self._take_id()
            packet = mqtt5.UnsubscribePacket(
                self._unsub_id, [r.subscription for r in self._routes]).write()
            self._out += packet
            if len(self._out) == len(packet):
                self._flush()
            elif not self._write_armed:
                self._write_armed = True
                self._wake()
        return self._unsubscribed.wait(timeout)

    def idle_for(self) -> float:
        """Seconds since anything came from the broker."""
        return time.monotonic() - self._last_read

    def loop_age(self) -> float:
        """Seconds since the I/O thread last went round its loop; inf once it has died."""
        if self._thread is None or not self._thread.is_alive():
            return float("inf")
        return time.monotonic() - self.loop_beat

    def _run(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    sock, connack, rest = self._connect()
                except (OSError, _Dropped) as exc:
                    why = (describe_connect_error(exc) if isinstance(exc, OSError)
                           else str(exc))
                    if self._stop.is_set():
                        return
                    delay = backoff_delay(attempt, self._cfg.reconnect_min_s,
                                          self._cfg.reconnect_max_s)
                    log.warning("broker %s unreachable (%s); retrying in %.1fs", self._addr,
                                why, delay)
                    attempt += 1
                    self._pause(delay)
                    continue
                if connack is None:  # refused: logged
                    delay = backoff_delay(attempt, self._cfg.reconnect_min_s,
                                          self._cfg.reconnect_max_s)
                    attempt += 1
                    self._pause(delay)
                    continue
                attempt = 0  # a link the broker accepted starts the backoff over
                began = time.monotonic()
                why, taken = self._serve(sock, connack, rest)
                if self._stop.is_set():
                    return
                self.last_disconnect = why
                if time.monotonic() - began > self._cfg.takeover_backoff_max_s:
                    self.takeovers = 0  # a long quiet link: a later takeover starts over
                    self._twin = None
                if taken or (self._twin is not None and why == _CLOSED_BY_BROKER):
                    self._pause(self._taken_over(why, taken))
                    continue
                self._event("broker_disconnected", reason=why)
                delay = backoff_delay(attempt, self._cfg.reconnect_min_s,
                                      self._cfg.reconnect_max_s)
                attempt += 1
                log.warning("connection to %s lost; reconnecting in %.1fs (%s)", self._addr,
                            delay, why)
                self._pause(delay)
        except Exception:
            log.exception("the MQTT I/O thread failed")  # loop_age() turns inf: watchdog
            raise

    def _taken_over(self, why: str, said: bool) -> float:
        """A link another client took over: name it, and how long to wait before the next."""
        self.takeovers += 1
        delay = takeover_delay(self.takeovers, self._cfg.takeover_backoff_s,
                               self._cfg.takeover_backoff_max_s)
        detected = why if said else f"{why}, and {self._twin}"
        self._twin = None  # the next takeover needs its own evidence (the twin may be gone)
        self.last_disconnect = f"session taken over: {detected}"
        log.error("session taken over: another client connected to %s with client id %s "
                  "(two agents with one device id?); %s; connecting again in %.0fs "
                  "(takeover %d in a row)", self._addr, self.client_id, detected, delay,
                  self.takeovers)
        self._event("session_taken_over", client_id=self.client_id, reason=detected,
                    retry_in_s=round(delay, 1), takeovers=self.takeovers,
                    message=f"another client connected with client id {self.client_id}")
        return delay

    def note_twin(self, evidence: str) -> None:
        """Another process uses our client id (the owner saw its trace, e.g. the retained
        state of a session not ours): if the broker now closes our link without a word, it
        was taken over. Any thread. Said (event) at once, while this link is up to carry
        it: a taken-over agent's own event waits out its backoff."""
        first = self._twin is None
        self._twin = evidence
        if first:
            log.error("another client uses client id %s on %s (two agents with one device "
                      "id?): %s", self.client_id, self._addr, evidence)
            self._event("session_taken_over", client_id=self.client_id, reason=evidence,
                        message=f"another client connected with client id {self.client_id}")

    def _event(self, kind: str, **fields: Any) -> None:
        if self._on_event_cb is None:
            return
        try:
            self._on_event_cb(kind, fields)
        except Exception:
            log.exception("event handler for %s failed", kind)

    def _pause(self, delay: float) -> None:
        """Wait out a reconnect delay in short steps, so the loop beat stays fresh."""
        deadline = time.monotonic() + delay
        while not self._stop.is_set():
            self.loop_beat = time.monotonic()
            left = deadline - self.loop_beat
            if left <= 0:
                return
            self._stop.wait(min(left, 1.0))

    # --- connecting ------------------------------------------------------------------------

    def _connect(self) -> tuple[socket.socket, mqtt5.ConnAckPacket | None, bytearray]:
        """Dial, CONNECT, wait for CONNACK (blocking, under connect_timeout_s). Returns the
        socket, the CONNACK (None when refused) and the bytes read after it."""
        timeout = self._cfg.connect_timeout_s
        sock = open_socket(self._addr, self._context, timeout)
        self._connecting = sock
        try:
            if self._stop.is_set():
                raise _Dropped("stopping")
            sock.settimeout(timeout)
            sock.sendall(self._connect_packet)
            buf = bytearray()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with memoryview(buf) as view:
                        packet, n = mqtt5.read(view)
                    break
                except IndexError:
                    pass
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # pyo3 panics are BaseExceptions
                    raise _Dropped(f"unreadable answer to CONNECT: {exc}") from None
                if time.monotonic() > deadline:
                    raise _Dropped(f"no CONNACK within {timeout:g}s")
                data = sock.recv(READ_CHUNK)
                if not data:
                    raise _Dropped("the broker closed the connection before CONNACK")
                buf += data
            if not isinstance(packet, mqtt5.ConnAckPacket):
                raise _Dropped(f"the broker answered CONNECT with {type(packet).__name__}")
            del buf[:n]
            if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                why = _reason(packet.reason_code, packet.reason_str)
                self.last_disconnect = f"CONNACK refused: {why}"
                log.error("broker %s refused the connection: %s", self._addr, why)
                self._event("broker_refused", reason=why)
                sock.close()
                return sock, None, buf
            sock.setblocking(False)
            return sock, packet, buf
        except BaseException:
            sock.close()
            raise
        finally:
            self._connecting = None

    def _established(self, sock: socket.socket, connack: mqtt5.ConnAckPacket) -> None:
        """CONNACK accepted: resume the session (resends, subscribe), then say so."""
        present = bool(connack.session_present)
        self.max_packet_size = connack.max_packet_size or MQTT_MAX_PACKET
        with self._lock:
            self._gen += 1
            if not present:
                self._epoch = self._gen
            self._send_quota = max(1, connack.receive_max)
            self._out.clear()
            # Always subscribe again: the broker may have lost our session.
            if self._subscribe_filters:
                self._sub_id = self._take_id()
                self._out += mqtt5.SubscribePacket(self._sub_id, self._subscribe_filters).write()
            # Unacknowledged publishes go again, in their order, with their packet ids.
            again = list(self._inflight.values())
            self._inflight.clear()
            self._held.extendleft(reversed(again))
            self._release_held(dup=present, resent=len(again))
            self._sock = sock
            self._write_armed = False
            self._flush()
        self.connect_count += 1
        self.connected.set()
        log.info("connected to %s as %s (session present: %s)", self._addr, self.client_id,
                 present)
        if again:
            log.info("sending %d unacknowledged publish(es) again%s", len(again),
                     "" if present else " (the broker kept no session: as new messages)")
        try:
            self._on_connected_cb()
        except Exception:
            log.exception("on_connect handler failed")

    # --- the connected loop (I/O thread) ---------------------------------------------------

    def _serve(self, sock: socket.socket, connack: mqtt5.ConnAckPacket,
               rest: bytearray) -> tuple[str, bool]:
        """Run one link until it ends; returns why it ended, and whether the broker said
        another client took the session over."""
        keepalive = float(connack.server_keep_alive or self._cfg.keepalive_s)
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        events = selectors.EVENT_READ
        self._last_read = self._last_write = time.monotonic()
        pinged = 0.0  # when our last PINGREQ went
        self._established(sock, connack)
        rbuf = rest
        self._discard = 0
        self._front_ok = False
        try:
            if rbuf:
                self._parse(rbuf, time.monotonic())
            while not self._stop.is_set():
                with self._lock:
                    want = selectors.EVENT_READ
                    if self._out:
                        want |= selectors.EVENT_WRITE
                    self._write_armed = bool(self._out)
                    last_write = self._last_write
                now = time.monotonic()
                if want != events:
                    sel.modify(sock, want)
                    events = want
                # A PINGREQ when nothing was sent for keepalive seconds (the broker's rule),
                # and when nothing came for that long: then the broker owes us an answer, so
                # silence past 1.5 x keepalive means the link is dead, not just quiet
                # (telemetry at QoS 0 keeps us writing while nothing comes back).
                ping_due = min(last_write, max(self._last_read, pinged)) + keepalive
                timeout = max(0.0, min(LOOP_TICK_S, ping_due - now))
                ready = sel.select(timeout)
                now = time.monotonic()
                self.loop_beat = now
                for key, mask in ready:
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    if mask & selectors.EVENT_WRITE:
                        with self._lock:
                            self._flush()
                    if mask & selectors.EVENT_READ:
                        self._read(sock, rbuf)
                now = time.monotonic()
                if now - self._last_read > 1.5 * keepalive:
                    raise _Dropped(f"nothing from the broker for {now - self._last_read:.1f}s "
                                   f"(keepalive {keepalive:g}s): the link is half-open")
                if now >= min(self._last_write, max(self._last_read, pinged)) + keepalive:
                    pinged = now
                    with self._lock:
                        self._out += _PINGREQ
                        self._flush()
                        self._last_write = max(self._last_write, now)  # even if not yet out
            self._goodbye(sock)
            return "stopped", False
        except _Dropped as exc:
            return str(exc), isinstance(exc, _TakenOver)
        except OSError as exc:
            return describe_connect_error(exc), False
        finally:
            self._lost(sock)
            sel.close()

    def _read(self, sock: socket.socket, rbuf: bytearray) -> None:
        """Read what the socket holds (for TLS, what OpenSSL has decrypted too) and parse."""
        tls = self._context is not None
        for _ in range(16):  # then round the loop: writes, keepalive and the loop beat
            try:
                if tls:
                    with self._lock:
                        data = sock.recv(READ_CHUNK)
                else:
                    data = sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not data:
                raise _Dropped(_CLOSED_BY_BROKER)
            now = time.monotonic()
            self._last_read = now
            got = len(data)
            if self._discard:  # the payload of a PUBLISH refused as over its limit
                cut = min(self._discard, got)
                self._discard -= cut
                data = data[cut:]
            if data:
                rbuf += data
                self._parse(rbuf, now)
            if got < READ_CHUNK and not (
                tls and isinstance(sock, ssl.SSLSocket) and sock.pending()
            ):
                return

    def _parse(self, rbuf: bytearray, now: float) -> None:
        """Take every whole packet off the front of `rbuf` and act on it."""
        pos = 0
        end = len(rbuf)
        wall = time.time()
        gen = self._gen << 16
        view = memoryview(rbuf)
        try:
            while pos < end:
                try:
                    packet, n = mqtt5.read(view[pos:])
                except IndexError:
                    # The rest has not arrived yet: unless it is a PUBLISH over its limit.
                    if (self._look_over is not None and not self._front_ok
                            and view[pos] >> 4 == 3):
                        taken = self._over_limit(view, pos, now, wall, gen)
                        if taken:
                            pos += taken
                            continue
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # pyo3 panics are BaseExceptions
                    skip = self._unreadable(view, pos, exc, now, wall, gen)
                    if skip is None:
                        break
                    pos += skip
                    continue
                pos += n
                if type(packet) is mqtt5.PublishPacket:
                    pid = packet.packet_id
                    self._deliver(Inbound(
                        packet.topic, packet.payload, int(packet.qos), packet.retain,
                        packet.response_topic, packet.correlation_data,
                        tuple(packet.user_properties), packet.message_expiry_interval,
                        now, wall, gen | pid if pid else 0,
                    ))
                elif type(packet) is mqtt5.PubAckPacket:
                    code = int(packet.reason_code)  # mqtt5's enums are no IntEnums
                    self._on_puback(packet.packet_id, code >= 0x80, code, packet.reason_str)
                else:
                    self._control(packet)
        finally:
            view.release()
        if pos:
            del rbuf[:pos]
            self._front_ok = False

    def _deliver(self, inbound: Inbound) -> None:
        """Hand a message to its route's handler (I/O thread: never block, never raise)."""
        route = self._exact.get(inbound.topic)
        if route is None:
            for words, candidate in self._wild:
                if _matches(words, inbound.topic):
                    route = candidate
                    break
        if inbound.qos == 2 and inbound.mid:
            # We subscribe at QoS 1; a broker that sends QoS 2 anyway gets its PUBREC now.
            self._write(b"\x50\x02" + (inbound.mid & 0xFFFF).to_bytes(2, "big"))
        try:
            if route is None:
                log.warning("message on unhandled topic %s dropped", inbound.topic)
                self.ack(inbound.mid, inbound.qos)
                return
            limit = route.max_payload
            if limit is not None and len(inbound.payload) > limit and not inbound.oversize:
                # Whole already (it came in one read): bounded by READ_CHUNK, not the limit.
                inbound = replace(inbound, payload=b"", oversize=len(inbound.payload))
            if inbound.oversize and not route.takes_unreadable:
                log.warning("message on %s dropped: its payload of %d bytes is over the "
                            "limit of %s", inbound.topic, inbound.oversize, limit)
                self.ack(inbound.mid, inbound.qos)
                return
            route.handler(inbound)
        except Exception:
            log.exception("handler for %s failed", inbound.topic)
            self.ack(inbound.mid, inbound.qos)

    def _over_limit(self, view: memoryview, pos: int, now: float, wall: float,
                    gen: int) -> int:
        """A partial PUBLISH at `pos` that may be over its route's max_payload. Returns the
        bytes to take off the buffer: all it holds from `pos` when the PUBLISH is refused
        (the rest of it is dropped as it arrives), else 0 and the loop waits for more."""
        end = len(view)
        try:
            n = frame_length(view, pos)
        except FrameError:
            return 0  # the codec raises on it when it has all arrived: _unreadable's case
        limit = self._look_over
        if n is None or limit is None or n <= limit:
            self._front_ok = n is not None
            return 0
        got = publish_head(bytes(view[pos:pos + min(end - pos, PUBLISH_HEAD_MAX)]))
        if got is None:
            if end - pos < PUBLISH_HEAD_MAX:
                return 0  # its variable header has not all arrived
            # Topic and properties longer than PUBLISH_HEAD_MAX: refused for that alone.
            head = salvage_publish(bytes(view[pos:pos + PUBLISH_HEAD_MAX]))
            head.payload = None
            size = n
        else:
            head, start = got
            size = n - start
        route = None
        if head.topic is not None:
            route = self._exact.get(head.topic) or next(
                (r for words, r in self._wild if _matches(words, head.topic)), None)
            if route is None or route.max_payload is None or (
                    got is not None and size <= route.max_payload):
                self._front_ok = True  # read whole, as any packet: within its bounds
                return 0
        self._discard = n - (end - pos)
        mid = gen | head.packet_id if head.packet_id else 0
        log.warning("PUBLISH on %s (%d bytes, packet id %d): its payload of %d bytes is over "
                    "the limit of %s; dropping it unread", head.topic, n, head.packet_id,
                    size, route.max_payload if route is not None else "its route")
        if route is not None and head.topic is not None:
            self._deliver(Inbound(
                head.topic, b"", head.qos, head.retain, head.response_topic,
                head.correlation_data, head.user_properties, head.expiry_s, now, wall, mid,
                oversize=max(1, size),
            ))
        elif head.qos == 2 and mid:
            self._write(b"\x50\x02" + head.packet_id.to_bytes(2, "big"))
        else:
            self.ack(mid, head.qos)
        return end - pos

    def _unreadable(self, view: memoryview, pos: int, exc: BaseException, now: float,
                    wall: float, gen: int) -> int | None:
        """A packet the codec refused: skip it whole (None while it has not all arrived)."""
        try:
            n = frame_length(view, pos)
        except FrameError as err:
            raise _Dropped(f"the stream from the broker cannot be framed: {err}") from None
        if n is None or pos + n > len(view):
            return None
        raw = bytes(view[pos:pos + n])
        kind = raw[0] >> 4
        name = PACKET_NAMES.get(kind, f"type {kind}")
        why = f"{type(exc).__name__}: {exc}"
        self.unreadable += 1
        if kind == 3:
            self._unreadable_publish(raw, why, now, wall, gen)
            return n
        self._event("mqtt_packet_unreadable", packet=name, bytes=n, reason=why)
        if kind in (4, 9):
            got = salvage_ack(raw)
            log.warning("unreadable %s (%d bytes) skipped (%s); its packet id: %s", name, n,
                        why, got[0] if got else "unreadable")
            if got is not None and kind == 4:
                self._on_puback(got[0], got[1] >= 0x80, got[1], None)
            elif got is not None and got[0] == self._sub_id:
                self.subscribed.set()
        else:
            log.warning("unreadable %s (%d bytes) from the broker skipped: %s", name, n, why)
        return n

    def _unreadable_publish(self, raw: bytes, why: str, now: float, wall: float,
                            gen: int) -> None:
        s = salvage_publish(raw)
        problems = "; ".join(s.problems) or why
        log.warning("unreadable PUBLISH on %s (%d bytes, packet id %d) skipped: %s",
                    s.topic if s.topic is not None else "an unreadable topic", len(raw),
                    s.packet_id, problems)
        self._event("mqtt_packet_unreadable", packet="PUBLISH", bytes=len(raw), topic=s.topic,
                    reason=problems)
        mid = gen | s.packet_id if s.packet_id else 0
        route = None
        if s.topic is not None:
            route = self._exact.get(s.topic) or next(
                (r for words, r in self._wild if _matches(words, s.topic)), None)
        if route is not None and route.takes_unreadable and s.payload is not None:
            # The job route answers it INVALID_ARGUMENT (to its Response Topic when that
            # could be read) and acknowledges it once journaled, like any malformed job.
            self._deliver(Inbound(
                s.topic or "", s.payload, s.qos, s.retain, s.response_topic,
                s.correlation_data, s.user_properties, s.expiry_s, now, wall, mid,
                unreadable=f"the MQTT packet of this job could not be read: {problems}",
            ))
            return
        if s.qos == 2 and mid:
            self._write(b"\x50\x02" + s.packet_id.to_bytes(2, "big"))
        else:
            self.ack(mid, s.qos)

    def _control(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PingRespPacket):
            return
        if isinstance(packet, mqtt5.SubAckPacket):
            with self._lock:
                if packet.packet_id == self._sub_id:
                    self._used_ids.discard(self._sub_id)
                    self._sub_id = 0
            for route, code in zip(self._routes, packet.reason_codes, strict=False):
                if int(code) >= 0x80:
                    log.error("broker %s refused the subscription %s: %s", self._addr,
                              route.subscription, _reason(code, packet.reason_str))
            self.subscribed.set()
        elif isinstance(packet, mqtt5.UnsubAckPacket):
            with self._lock:
                if packet.packet_id == self._unsub_id:
                    self._used_ids.discard(self._unsub_id)
                    self._unsub_id = 0
                    self._unsubscribed.set()
        elif isinstance(packet, mqtt5.DisconnectPacket):
            why = _reason(packet.reason_code, packet.reason_str)
            log.warning("disconnected from %s: %s", self._addr, why)
            if int(packet.reason_code) == _TAKEN_OVER:
                raise _TakenOver(f"DISCONNECT from the broker: {why}")
            raise _Dropped(f"DISCONNECT from the broker: {why}")
        elif isinstance(packet, mqtt5.PubRelPacket):
            self._write(b"\x70\x02" + packet.packet_id.to_bytes(2, "big"))  # PUBCOMP
        elif isinstance(packet, mqtt5.PubRecPacket):
            # We publish at QoS 0 and 1 only; release whatever the broker thinks it got.
            self._write(b"\x62\x02" + packet.packet_id.to_bytes(2, "big"))  # PUBREL
            rec = int(packet.reason_code)
            self._on_puback(packet.packet_id, rec >= 0x80, rec, packet.reason_str)
        elif isinstance(packet, mqtt5.PubCompPacket):
            return
        else:
            log.warning("unexpected %s from the broker ignored", type(packet).__name__)

    def _on_puback(self, pid: int, failed: bool, code: int, reason: str | None) -> None:
        with self._lock:
            info = self._inflight.pop(pid, None)
            if info is None:
                return
            self._used_ids.discard(pid)
            if self._held and self._sock is not None:
                self._release_held(dup=False, resent=0)
                self._flush()
        info._set_done()
        if failed:
            log.warning("broker %s refused publish %d: %s", self._addr, pid,
                        _reason(code, reason))
        if self._on_published_cb is not None:
            try:
                self._on_published_cb(pid, failed)
            except Exception:
                log.exception("on_publish handler failed")

    def _goodbye(self, sock: socket.socket) -> None:
        """A clean stop: what is queued, then DISCONNECT (no will), within a second."""
        with self._lock:
            self._out += _DISCONNECT
            self._flush()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with self._lock:
                if not self._out:
                    return
            time.sleep(0.01)
            with self._lock:
                self._flush()

    def _lost(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = None
            self._out.clear()  # a packet cut in two must not start the next link
            if self._sub_id:
                self._used_ids.discard(self._sub_id)
                self._sub_id = 0
        self.connected.clear()
        self.subscribed.clear()
        with contextlib.suppress(OSError):
            sock.close()

    # --- writing (any thread) ---------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is pending already
            self._wake_w.send(b"\0")

    def _flush(self) -> None:
        """Under _lock: write what the socket takes now; wake the I/O thread for the rest."""
        sock = self._sock
        if sock is None or not self._out:
            return
        try:
            # TLS: OpenSSL wants a write retried with the same bytes first; _out only ever
            # grows at its end until a write succeeds, so it is.
            n = sock.send(self._out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            n = 0
        except OSError:
            n = 0  # the I/O thread finds the link gone on its next read
        if n:
            del self._out[:n]
            self._last_write = time.monotonic()
        if self._out and not self._write_armed:
            self._write_armed = True
            self._wake()

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._sock is None:
                return
            self._out += data
            if len(self._out) == len(data):
                self._flush()
            elif not self._write_armed:
                self._write_armed = True
                self._wake()

    def _take_id(self) -> int:
        """Under _lock: the next packet id that nothing in flight uses."""
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._used_ids:
                self._used_ids.add(self._next_id)
                return self._next_id
        return 0

    def _release_held(self, *, dup: bool, resent: int) -> None:
        """Under _lock: move held publishes into flight while the broker's Receive Maximum
        allows; the first `resent` of them were in flight on the last link."""
        while self._held and len(self._inflight) < self._send_quota:
            info = self._held.popleft()
            packet = info.packet
            if dup and resent > 0:
                packet = bytes((packet[0] | 0x08,)) + packet[1:]
            resent -= 1
            self._inflight[info.mid] = info
            self._out += packet

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (any thread): PUBACK for QoS 1."""
        if qos != 1 or not mid:
            return
        if (mid >> 16) < self._epoch:
            # It came on a link whose session the broker has since forgotten: the broker
            # sends it again, and this id may name another message now.
            return
        self._write(b"\x40\x02" + (mid & 0xFFFF).to_bytes(2, "big"))

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> PublishInfo:
        """Queue a message (any thread, never blocks); written at once when the link and
        the broker's Receive Maximum allow. QoS 1 messages wait for a link; QoS 0 ones
        are dropped without one (rc 4), as paho does."""
        pid = 0
        if qos:
            with self._lock:
                pid = self._take_id()
            if not pid:
                log.error("publish to %s refused: all 65,535 packet ids are in use", topic)
                return PublishInfo(0, b"", RC_QUEUE_SIZE)
        try:
            packet = mqtt5.PublishPacket(
                topic, payload, qos=_QOS[qos], retain=retain, packet_id=pid or None,
                correlation_data=correlation_data,
                user_properties=list(user_properties) if user_properties else None,
            ).write()
        except BaseException:
            if pid:
                with self._lock:
                    self._used_ids.discard(pid)
            raise
        info = PublishInfo(pid, packet)
        if len(packet) > self.max_packet_size:
            return self._refuse_oversize(info, topic)
        with self._lock:
            if not qos:
                if self._sock is None:
                    info.rc = RC_NO_CONN
                    return info
                info._done = True
                self._out += packet
            elif (self._sock is not None and not self._held
                  and len(self._inflight) < self._send_quota):
                self._inflight[pid] = info
                self._out += packet
            else:
                self._held.append(info)
                return info
            if len(self._out) == len(packet):  # nothing queued before it: write now
                self._flush()
            elif not self._write_armed:
                self._write_armed = True
                self._wake()
        return info

    def _refuse_oversize(self, info: PublishInfo, topic: str) -> PublishInfo:
        log.error("publish to %s refused: %d bytes is over the broker's maximum packet size "
                  "of %d", topic, len(info.packet), self.max_packet_size)
        info.rc = RC_PAYLOAD_SIZE
        info.packet = b""
        if info.mid:
            with self._lock:
                self._used_ids.discard(info.mid)
            if self._on_published_cb is not None:
                try:
                    self._on_published_cb(info.mid, True)
                except Exception:
                    log.exception("on_publish handler failed")
        return info


def _reason(code: object, text: str | None) -> str:
    """'Not authorized (0x87): <the broker's reason string>'."""
    value = int(code)  # type: ignore[call-overload]
    name = getattr(code, "name", None) or "reason"
    words = f"{name.replace('_', ' ').capitalize()} (0x{value:02x})"  # as paho words it
    return f"{words}: {text}" if text else words


def _route_table(
    routes: Sequence[Route],
) -> tuple[dict[str, Route], list[tuple[tuple[str, ...], Route]]]:
    """Exact topics in a dict, wildcard filters in order; first route that matches wins
    (an exact route behind a wildcard that also matches it stays in the ordered list)."""
    exact: dict[str, Route] = {}
    wild: list[tuple[tuple[str, ...], Route]] = []
    for route in routes:
        filt = route.match_filter
        words = tuple(filt.split("/"))
        if "+" in words or "#" in words or any(_matches(w, filt) for w, _ in wild):
            wild.append((words, route))
        else:
            exact.setdefault(filt, route)
    return exact, wild


def _matches(words: tuple[str, ...], topic: str) -> bool:
    """MQTT topic filter matching; `$` topics match no leading wildcard."""
    levels = topic.split("/")
    if levels[0].startswith("$") and words and words[0] in ("+", "#"):
        return False
    for i, word in enumerate(words):
        if word == "#":
            return True
        if i >= len(levels):
            return False
        if word != "+" and word != levels[i]:
            return False
    return len(levels) == len(words)


__all__ = [
    "Handler", "Inbound", "MqttSession", "PublishInfo", "Retained",
    "Route", "backoff_delay", "session_of_mid", "takeover_delay",
]
