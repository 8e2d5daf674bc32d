"""What the session sends, from any thread: the outgoing buffer, the packet ids, the QoS 1
publishes in flight or held, and our SUBSCRIBE and UNSUBSCRIBE awaiting their answers.

A publish from any thread appends its bytes to the outgoing buffer under `lock` and, when
nothing is queued before it, writes them to the non-blocking socket itself (an answer goes
out without a second queue when the window allows). A partial write leaves the rest for the
I/O thread (agent/mqtt_session/session.py), which it wakes through the `wake_r`/`wake_w`
socketpair. `publish()` and `ack()` never block on the network.

`lock` guards the socket's writes (and, for TLS, its reads too: an SSL object is not safe
for a read and a write at once; agent/mqtt_session/inbound.py takes it to read), the
outgoing buffer, the packet ids and the QoS 1 publishes in flight or held. `on_published`
runs on the I/O thread, never under `lock`, wrapped so that an exception is only logged.

QoS 1 publishes beyond the broker's Receive Maximum wait in `_held`. On a reconnect
(`resume`) those not acknowledged go again with their packet ids: with DUP when the broker
kept the session, as new publishes when it did not. `ack(mid, qos)` sends a PUBACK only
for a message of a connection whose session the broker still has (`epoch`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import mqtt5

from edgeinfer.agent.mqtt_session.link_end import reason_words
from edgeinfer.agent.mqtt_session.messages import Route
from edgeinfer.contract.brokerurl import BrokerAddress

log = logging.getLogger(__name__)

MQTT_MAX_PACKET = 268_435_455  # the protocol's own limit when the broker names none

# paho's return codes, for callers that look at `rc`.
RC_SUCCESS = 0
RC_NO_CONN = 4
RC_PAYLOAD_SIZE = 9
RC_QUEUE_SIZE = 15

QOS = (mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE, mqtt5.QoS.EXACTLY_ONCE)
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"


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


class Outbound:
    """The sending half of one MQTT session; `publish` and `ack` are thread-safe."""

    def __init__(self, addr: BrokerAddress, routes: Sequence[Route],
                 on_published: Callable[[int, bool], None] | None, mid_tag: int) -> None:
        self._addr = addr
        self._on_published_cb = on_published
        # The broker's CONNACK may lower this (MQTT v5 Maximum Packet Size).
        self.max_packet_size = MQTT_MAX_PACKET
        self._subscriptions = [r.subscription for r in routes]
        self._subscribe_filters = [
            mqtt5.TopicFilter(r.subscription, max_qos=QOS[r.qos]) for r in routes
        ]
        self.lock = threading.Lock()
        self._sock: socket.socket | None = None  # set while a session is up (after CONNACK)
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
        self.gen = mid_tag << 32
        self._epoch = self.gen  # the connection that last started a new session at the broker
        self.last_write = 0.0
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # --- the link's start and end (I/O thread) ----------------------------------------------

    def resume(self, sock: socket.socket, present: bool, receive_max: int) -> int:
        """CONNACK accepted: subscribe again, queue the unacknowledged publishes (in their
        order, with their packet ids) and write. Returns how many go again."""
        with self.lock:
            self.gen += 1
            if not present:
                self._epoch = self.gen
            self._send_quota = max(1, receive_max)
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
        return len(again)

    def want_write(self) -> tuple[bool, float]:
        """The I/O thread, each time round: whether bytes wait for the socket (it now knows,
        so no wake-up is needed for them), and when we last wrote."""
        with self.lock:
            pending = bool(self._out)
            self._write_armed = pending
            return pending, self.last_write

    def flush(self) -> None:
        """The socket can take more (I/O thread)."""
        with self.lock:
            self._flush()

    def drain_wake(self) -> None:
        """Empty the wake-up socket (I/O thread)."""
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def ping(self, now: float) -> None:
        with self.lock:
            self._out += _PINGREQ
            self._flush()
            self.last_write = max(self.last_write, now)  # even if not yet out

    def goodbye(self) -> None:
        """A clean stop: what is queued, then DISCONNECT (no will), within a second."""
        with self.lock:
            self._out += _DISCONNECT
            self._flush()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with self.lock:
                if not self._out:
                    return
            time.sleep(0.01)
            with self.lock:
                self._flush()

    def lost(self) -> None:
        """The link is gone: nothing more is written until the next `resume`."""
        with self.lock:
            self._sock = None
            self._out.clear()  # a packet cut in two must not start the next link
            if self._sub_id:
                self._used_ids.discard(self._sub_id)
                self._sub_id = 0

    # --- subscriptions ----------------------------------------------------------------------

    def unsubscribe_all(self, timeout: float) -> bool:
        """UNSUBSCRIBE every route and no SUBSCRIBE on later reconnects (any thread); True
        once the broker confirmed (UNSUBACK) within `timeout`."""
        with self.lock:
            self._subscribe_filters = []
            if self._sock is None or not self._subscriptions:
                return False
            self._unsub_id = self._take_id()
            self._queue(mqtt5.UnsubscribePacket(self._unsub_id, self._subscriptions).write())
        return self._unsubscribed.wait(timeout)

    def on_suback(self, pid: int) -> None:
        with self.lock:
            if pid == self._sub_id:
                self._used_ids.discard(self._sub_id)
                self._sub_id = 0

    def on_unsuback(self, pid: int) -> None:
        with self.lock:
            if pid == self._unsub_id:
                self._used_ids.discard(self._unsub_id)
                self._unsub_id = 0
                self._unsubscribed.set()

    def is_subscribe(self, pid: int) -> bool:
        """Whether `pid` is our SUBSCRIBE's, awaiting its SUBACK."""
        return pid == self._sub_id

    # --- writing (any thread) ---------------------------------------------------------------

    def wake(self) -> None:
        """Have the I/O thread go round its loop now."""
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is pending already
            self._wake_w.send(b"\0")

    def _flush(self) -> None:
        """Under lock: write what the socket takes now; wake the I/O thread for the rest."""
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
            self.last_write = time.monotonic()
        if self._out and not self._write_armed:
            self._write_armed = True
            self.wake()

    def _queue(self, packet: bytes) -> None:
        """Under lock: append a packet; written now when nothing is queued before it, else
        the I/O thread is told (once) that bytes wait."""
        self._out += packet
        if len(self._out) == len(packet):  # nothing queued before it: write now
            self._flush()
        elif not self._write_armed:
            self._write_armed = True
            self.wake()

    def write(self, data: bytes) -> None:
        """Send a packet on the link that is up; dropped without one."""
        with self.lock:
            if self._sock is None:
                return
            self._queue(data)

    def _take_id(self) -> int:
        """Under lock: the next packet id that nothing in flight uses."""
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._used_ids:
                self._used_ids.add(self._next_id)
                return self._next_id
        return 0

    def _release_held(self, *, dup: bool, resent: int) -> None:
        """Under lock: move held publishes into flight while the broker's Receive Maximum
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
        self.write(b"\x40\x02" + (mid & 0xFFFF).to_bytes(2, "big"))

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
            with self.lock:
                pid = self._take_id()
            if not pid:
                log.error("publish to %s refused: all 65,535 packet ids are in use", topic)
                return PublishInfo(0, b"", RC_QUEUE_SIZE)
        try:
            packet = mqtt5.PublishPacket(
                topic, payload, qos=QOS[qos], retain=retain, packet_id=pid or None,
                correlation_data=correlation_data,
                user_properties=list(user_properties) if user_properties else None,
            ).write()
        except BaseException:
            if pid:
                with self.lock:
                    self._used_ids.discard(pid)
            raise
        info = PublishInfo(pid, packet)
        if len(packet) > self.max_packet_size:
            return self._refuse_oversize(info, topic)
        with self.lock:
            if not qos:
                if self._sock is None:
                    info.rc = RC_NO_CONN
                    return info
                info._done = True
            elif (self._sock is not None and not self._held
                  and len(self._inflight) < self._send_quota):
                self._inflight[pid] = info
            else:
                self._held.append(info)
                return info
            self._queue(packet)
        return info

    def _refuse_oversize(self, info: PublishInfo, topic: str) -> PublishInfo:
        log.error("publish to %s refused: %d bytes is over the broker's maximum packet size "
                  "of %d", topic, len(info.packet), self.max_packet_size)
        info.rc = RC_PAYLOAD_SIZE
        info.packet = b""
        if info.mid:
            with self.lock:
                self._used_ids.discard(info.mid)
            self._published(info.mid, True)
        return info

    def on_puback(self, pid: int, failed: bool, code: int, reason: str | None) -> None:
        """The broker's answer to publish `pid` (I/O thread): it is done, and a held
        publish may take its place."""
        with self.lock:
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
                        reason_words(code, reason))
        self._published(pid, failed)

    def _published(self, pid: int, failed: bool) -> None:
        if self._on_published_cb is not None:
            try:
                self._on_published_cb(pid, failed)
            except Exception:
                log.exception("on_publish handler failed")
