"""What the session hears, on the I/O thread: bytes from the socket parsed into packets
(mqtt5, in Rust), each PUBLISH handed to its route's handler, each acknowledgement and
control packet acted on.

Handlers run on the I/O thread, never under the outbound lock; each is wrapped so that an
exception is logged (and the message acknowledged) and never ends the thread. Handlers
must only hand work off (a bounded queue's put_nowait).

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

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import mqtt5

from edgeinfer.agent.mqtt_session.link_end import (
    CLOSED_BY_BROKER,
    TAKEN_OVER,
    LinkDropped,
    TakenOver,
    reason_words,
)
from edgeinfer.agent.mqtt_session.messages import Inbound, Route, RouteTable
from edgeinfer.agent.mqtt_session.outbound import Outbound
from edgeinfer.agent.mqtt_wire import (
    PACKET_NAMES,
    PUBLISH_HEAD_MAX,
    FrameError,
    frame_length,
    publish_head,
    salvage_ack,
    salvage_publish,
)
from edgeinfer.contract.brokerurl import BrokerAddress

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024


class Reader:
    """The receiving half of one MQTT session (I/O thread only)."""

    def __init__(self, addr: BrokerAddress, routes: Sequence[Route], outbound: Outbound,
                 subscribed: threading.Event, tls: bool,
                 event: Callable[..., None]) -> None:
        """`subscribed` is set on SUBACK; `event(kind, **fields)` tells the owner of what
        operators should hear of beyond the log (a packet skipped as unreadable)."""
        self._addr = addr
        self._routes = tuple(routes)
        self._table = RouteTable(self._routes)
        self._outbound = outbound
        self.subscribed = subscribed
        self._tls = tls
        self._event = event
        # A PUBLISH longer than this (fixed header included) may be over a route's limit;
        # a shorter one cannot be, and is never looked at before the codec reads it.
        limits = [r.max_payload for r in self._routes if r.max_payload is not None]
        self._look_over = min(limits) if limits else None
        self._discard = 0  # bytes of a refused PUBLISH still to drop unread
        self._front_ok = False  # the partial packet at rbuf's front passed
        self.last_read = 0.0  # when anything last came from the broker
        self.unreadable = 0  # packets the codec refused (skipped, acknowledged)

    def new_link(self, now: float) -> None:
        """A link begins: nothing is half read."""
        self.last_read = now
        self._discard = 0
        self._front_ok = False

    def read(self, sock: socket.socket, rbuf: bytearray) -> None:
        """Read what the socket holds (for TLS, what OpenSSL has decrypted too) and parse."""
        tls = self._tls
        for _ in range(16):  # then round the loop: writes, keepalive and the loop beat
            try:
                if tls:
                    with self._outbound.lock:
                        data = sock.recv(READ_CHUNK)
                else:
                    data = sock.recv(READ_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not data:
                raise LinkDropped(CLOSED_BY_BROKER)
            now = time.monotonic()
            self.last_read = now
            got = len(data)
            if self._discard:  # the payload of a PUBLISH refused as over its limit
                cut = min(self._discard, got)
                self._discard -= cut
                data = data[cut:]
            if data:
                rbuf += data
                self.parse(rbuf, now)
            if got < READ_CHUNK and not (
                tls and isinstance(sock, ssl.SSLSocket) and sock.pending()
            ):
                return

    def parse(self, rbuf: bytearray, now: float) -> None:
        """Take every whole packet off the front of `rbuf` and act on it."""
        pos = 0
        end = len(rbuf)
        wall = time.time()
        gen = self._outbound.gen << 16
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
                    self._outbound.on_puback(packet.packet_id, code >= 0x80, code, packet.reason_str)
                else:
                    self._control(packet)
        finally:
            view.release()
        if pos:
            del rbuf[:pos]
            self._front_ok = False

    def _deliver(self, inbound: Inbound) -> None:
        """Hand a message to its route's handler (I/O thread: never block, never raise)."""
        route = self._table.find(inbound.topic)
        if inbound.qos == 2 and inbound.mid:
            # We subscribe at QoS 1; a broker that sends QoS 2 anyway gets its PUBREC now.
            self._outbound.write(b"\x50\x02" + (inbound.mid & 0xFFFF).to_bytes(2, "big"))
        try:
            if route is None:
                log.warning("message on unhandled topic %s dropped", inbound.topic)
                self._outbound.ack(inbound.mid, inbound.qos)
                return
            limit = route.max_payload
            if limit is not None and len(inbound.payload) > limit and not inbound.oversize:
                # Whole already (it came in one read): bounded by READ_CHUNK, not the limit.
                inbound = replace(inbound, payload=b"", oversize=len(inbound.payload))
            if inbound.oversize and not route.takes_unreadable:
                log.warning("message on %s dropped: its payload of %d bytes is over the "
                            "limit of %s", inbound.topic, inbound.oversize, limit)
                self._outbound.ack(inbound.mid, inbound.qos)
                return
            route.handler(inbound)
        except Exception:
            log.exception("handler for %s failed", inbound.topic)
            self._outbound.ack(inbound.mid, inbound.qos)

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
            route = self._table.find(head.topic)
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
            self._outbound.write(b"\x50\x02" + head.packet_id.to_bytes(2, "big"))
        else:
            self._outbound.ack(mid, head.qos)
        return end - pos

    def _unreadable(self, view: memoryview, pos: int, exc: BaseException, now: float,
                    wall: float, gen: int) -> int | None:
        """A packet the codec refused: skip it whole (None while it has not all arrived)."""
        try:
            n = frame_length(view, pos)
        except FrameError as err:
            raise LinkDropped(f"the stream from the broker cannot be framed: {err}") from None
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
                self._outbound.on_puback(got[0], got[1] >= 0x80, got[1], None)
            elif got is not None and self._outbound.is_subscribe(got[0]):
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
            route = self._table.find(s.topic)
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
            self._outbound.write(b"\x50\x02" + s.packet_id.to_bytes(2, "big"))
        else:
            self._outbound.ack(mid, s.qos)

    def _control(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PingRespPacket):
            return
        if isinstance(packet, mqtt5.SubAckPacket):
            self._outbound.on_suback(packet.packet_id)
            for route, code in zip(self._routes, packet.reason_codes, strict=False):
                if int(code) >= 0x80:
                    log.error("broker %s refused the subscription %s: %s", self._addr,
                              route.subscription, reason_words(code, packet.reason_str))
            self.subscribed.set()
        elif isinstance(packet, mqtt5.UnsubAckPacket):
            self._outbound.on_unsuback(packet.packet_id)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            why = reason_words(packet.reason_code, packet.reason_str)
            log.warning("disconnected from %s: %s", self._addr, why)
            if int(packet.reason_code) == TAKEN_OVER:
                raise TakenOver(f"DISCONNECT from the broker: {why}")
            raise LinkDropped(f"DISCONNECT from the broker: {why}")
        elif isinstance(packet, mqtt5.PubRelPacket):
            self._outbound.write(b"\x70\x02" + packet.packet_id.to_bytes(2, "big"))  # PUBCOMP
        elif isinstance(packet, mqtt5.PubRecPacket):
            # We publish at QoS 0 and 1 only; release whatever the broker thinks it got.
            self._outbound.write(b"\x62\x02" + packet.packet_id.to_bytes(2, "big"))  # PUBREL
            rec = int(packet.reason_code)
            self._outbound.on_puback(packet.packet_id, rec >= 0x80, rec, packet.reason_str)
        elif isinstance(packet, mqtt5.PubCompPacket):
            return
        else:
            log.warning("unexpected %s from the broker ignored", type(packet).__name__)

