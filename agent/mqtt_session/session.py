"""The agent's MQTT v5 session on the `mqtt5` codec: one I/O thread, persistent session.

This module runs the link: connecting (with backoff), the I/O thread's loop, keepalive,
takeover detection. What is sent, from any thread, is agent/mqtt_session/outbound.py's;
what is heard, agent/mqtt_session/inbound.py's; the package's docstring tells the threads.

Session. CONNECT: clean start off, session expiry, our Receive Maximum, the retained QoS 1
will, user name and password. The broker's CONNACK gives its Receive Maximum (QoS 1
publishes beyond it wait in the outbound's `_held`), Maximum Packet Size and Server Keep
Alive. Every (re)connect subscribes again. QoS 1 publishes not acknowledged when the link
dropped are sent again with their packet ids: with DUP when the broker kept the session, as
new publishes when it did not (an answer is never lost because a broker forgot its
session). A received QoS 1 message is acknowledged by `ack(mid, qos)` from another thread
once it is journaled; its `mid` carries the connection it came on, so an ack that outlived
a session the broker forgot is not sent on the next one (it could name another message).

Takeover. A second client with our client id (two agents given one device id) takes the
session over; reconnecting at once would take it back, and the two would storm (146
connects each in 30 s, measured before this on mosquitto 2.0.11). So a takeover is named (event
`session_taken_over`, `last_disconnect`) and the next connect waits
`broker.takeover_backoff_s`, doubling on each repeat up to `broker.takeover_backoff_max_s`.
A broker that follows MQTT 5 says so with DISCONNECT 0x8E; mosquitto before 2.0.15 (2.0.11
measured here) closes the old link without a word, so the owner (agent/daemon.py) also
calls `note_twin` when the device's retained state shows another process's session: a link
the broker then closes counts as a takeover too.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import mqtt5

from edgeinfer.agent.config import BrokerConfig
from edgeinfer.agent.mqtt_session.backoff import backoff_delay, takeover_delay
from edgeinfer.agent.mqtt_session.inbound import READ_CHUNK, Reader
from edgeinfer.agent.mqtt_session.link_end import (
    CLOSED_BY_BROKER,
    LinkDropped,
    TakenOver,
    reason_words,
)
from edgeinfer.agent.mqtt_session.messages import Retained, Route
from edgeinfer.agent.mqtt_session.outbound import MQTT_MAX_PACKET, Outbound, PublishInfo
from edgeinfer.agent.mqtt_wire import open_socket
from edgeinfer.agent.tls import security_from_config
from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.transport import describe_connect_error

log = logging.getLogger(__name__)

# Our Receive Maximum: QoS 1 jobs the broker may have unacknowledged with us. The intake
# queue holds at least 1,024 (agent/intake.py); beyond that the broker keeps them.
RECEIVE_MAXIMUM = 1024
LOOP_TICK_S = 0.5  # the loop goes round at least this often (the watchdog's loop beat)


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
        # What the session saw that operators should hear of beyond the log: a link the
        # broker ended or refused (with its reason code), a packet skipped as unreadable.
        self._on_event_cb = on_event
        self._on_connected_cb = on_connected
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
        self._outbound = Outbound(self._addr, routes, on_published, mid_tag)
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
        self.takeovers = 0  # links another client with our id took over, in a row
        # Set by note_twin: another process with our client id is about, so a link the
        # broker closes without a DISCONNECT (mosquitto < 2.0.15) counts as taken over.
        self._twin: str | None = None
        self._thread: threading.Thread | None = None

        self._connecting: socket.socket | None = None
        self._reader = Reader(self._addr, routes, self._outbound, self.subscribed,
                              self._context is not None, self._event)

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
        self._outbound.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def unsubscribe_all(self, timeout: float) -> bool:
        """Stop the broker sending us anything new (any thread): UNSUBSCRIBE every route,
        and no SUBSCRIBE on later reconnects. True once the broker confirmed (UNSUBACK)
        within `timeout`. Messages it had already sent or queued for us still come."""
        return self._outbound.unsubscribe_all(timeout)

    def idle_for(self) -> float:
        """Seconds since anything came from the broker."""
        return time.monotonic() - self._reader.last_read

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
                except (OSError, LinkDropped) as exc:
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
                if taken or (self._twin is not None and why == CLOSED_BY_BROKER):
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
                raise LinkDropped("stopping")
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
                    raise LinkDropped(f"unreadable answer to CONNECT: {exc}") from None
                if time.monotonic() > deadline:
                    raise LinkDropped(f"no CONNACK within {timeout:g}s")
                data = sock.recv(READ_CHUNK)
                if not data:
                    raise LinkDropped("the broker closed the connection before CONNACK")
                buf += data
            if not isinstance(packet, mqtt5.ConnAckPacket):
                raise LinkDropped(f"the broker answered CONNECT with {type(packet).__name__}")
            del buf[:n]
            if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                why = reason_words(packet.reason_code, packet.reason_str)
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
        self._outbound.max_packet_size = connack.max_packet_size or MQTT_MAX_PACKET
        again = self._outbound.resume(sock, present, connack.receive_max)
        self.connect_count += 1
        self.connected.set()
        log.info("connected to %s as %s (session present: %s)", self._addr, self.client_id,
                 present)
        if again:
            log.info("sending %d unacknowledged publish(es) again%s", again,
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
        outbound, reader = self._outbound, self._reader
        sel.register(outbound.wake_r, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        events = selectors.EVENT_READ
        began = time.monotonic()
        reader.new_link(began)
        outbound.last_write = began
        pinged = 0.0  # when our last PINGREQ went
        self._established(sock, connack)
        rbuf = rest
        try:
            if rbuf:
                reader.parse(rbuf, time.monotonic())
            while not self._stop.is_set():
                pending, last_write = outbound.want_write()
                want = selectors.EVENT_READ
                if pending:
                    want |= selectors.EVENT_WRITE
                now = time.monotonic()
                if want != events:
                    sel.modify(sock, want)
                    events = want
                # A PINGREQ when nothing was sent for keepalive seconds (the broker's rule),
                # and when nothing came for that long: then the broker owes us an answer, so
                # silence past 1.5 x keepalive means the link is dead, not just quiet
                # (telemetry at QoS 0 keeps us writing while nothing comes back).
                ping_due = min(last_write, max(reader.last_read, pinged)) + keepalive
                timeout = max(0.0, min(LOOP_TICK_S, ping_due - now))
                ready = sel.select(timeout)
                now = time.monotonic()
                self.loop_beat = now
                for key, mask in ready:
                    if key.fileobj is outbound.wake_r:
                        outbound.drain_wake()
                        continue
                    if mask & selectors.EVENT_WRITE:
                        outbound.flush()
                    if mask & selectors.EVENT_READ:
                        reader.read(sock, rbuf)
                now = time.monotonic()
                if now - reader.last_read > 1.5 * keepalive:
                    raise LinkDropped(f"nothing from the broker for {now - reader.last_read:.1f}s "
                                      f"(keepalive {keepalive:g}s): the link is half-open")
                if now >= min(outbound.last_write, max(reader.last_read, pinged)) + keepalive:
                    pinged = now
                    outbound.ping(now)
            outbound.goodbye()
            return "stopped", False
        except LinkDropped as exc:
            return str(exc), isinstance(exc, TakenOver)
        except OSError as exc:
            return describe_connect_error(exc), False
        finally:
            self._lost(sock)
            sel.close()

    def _lost(self, sock: socket.socket) -> None:
        self._outbound.lost()
        self.connected.clear()
        self.subscribed.clear()
        with contextlib.suppress(OSError):
            sock.close()

    # --- what the owner calls (any thread) ----------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> PublishInfo:
        """Queue a message (never blocks); written at once when the link and the broker's
        Receive Maximum allow. QoS 1 messages wait for a link; QoS 0 ones are dropped
        without one (rc 4), as paho does."""
        return self._outbound.publish(topic, payload, qos, retain, correlation_data,
                                      user_properties)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message: PUBACK for QoS 1."""
        self._outbound.ack(mid, qos)

    @property
    def max_packet_size(self) -> int:
        """The most bytes a packet to the broker may have (its CONNACK may lower it)."""
        return self._outbound.max_packet_size

    @property
    def unreadable(self) -> int:
        """Packets the codec refused (skipped, acknowledged)."""
        return self._reader.unreadable
