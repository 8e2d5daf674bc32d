"""The MQTT transport alone, on the `mqtt5` codec: the echo of bench/echo.py without paho.

One thread, one blocking TCP socket (TCP_NODELAY), packets encoded and decoded by the
`mqtt5` package (Rust). It connects (clean start, no keep-alive asked), subscribes to
`{prefix}/dev/<device>/jobs` for each canned device at QoS 1 and, for each QoS 1 PUBLISH,
sends its PUBACK and answers on its Response Topic (else `{prefix}/dev/<device>/results`)
with its Correlation Data and the canned body and user properties, at QoS 1, as the paho
echo does; the answers' PUBACKs are tracked (no more in flight than the broker's Receive
Maximum; the rest wait their turn). Everything a read of the socket brought is answered
in one write. No decode of the job, no inference, no journal: what MQTT itself costs a
responder written close to the wire.

    python -m bench.codec_echo mqtt://127.0.0.1:1883 /tmp/canned
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, NoReturn

import mqtt5

from bench.echo import load_canned
from edgeinfer.agent.mqtt_wire import frame_length
from edgeinfer.contract.brokerurl import parse_broker_url

READY = "codec echo ready"
_READ_SIZE = 1 << 20


class _Stop(Exception):
    """SIGTERM: leave the loop, say DISCONNECT."""


def _stop(*_: Any) -> NoReturn:
    raise _Stop


class CodecEcho:
    """The answering loop; `sock` is connected and the session is up (see `open_session`)."""

    def __init__(self, sock: socket.socket, prefix: str,
                 canned: dict[str, tuple[bytes, list[tuple[str, str]]]], receive_max: int,
                 keep_alive_s: int = 0) -> None:
        self._sock = sock
        self._ping_after = keep_alive_s / 2 if keep_alive_s else None
        self._prefix = prefix
        self._canned = canned
        self._receive_max = max(1, receive_max)
        self._ids = itertools.cycle(range(1, 65536))
        self._in_flight: set[int] = set()  # our answers not yet PUBACKed
        self._waiting: deque[tuple[str, bytes, bytes | None, list[tuple[str, str]]]] = deque()
        self.answered = 0

    def _answer(self, topic: str, body: bytes, correlation: bytes | None,
                props: list[tuple[str, str]]) -> bytes:
        packet_id = next(self._ids)
        while packet_id in self._in_flight:
            packet_id = next(self._ids)
        self._in_flight.add(packet_id)
        self.answered += 1
        return mqtt5.PublishPacket(topic, body, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=packet_id,
                                   correlation_data=correlation, user_properties=props).write()

    def handle(self, packet: mqtt5.Packet, out: list[bytes]) -> bool:
        """Append what `packet` calls for to `out`; False when the broker said goodbye."""
        if isinstance(packet, mqtt5.PublishPacket):
            if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                out.append(mqtt5.PubAckPacket(packet.packet_id).write())
            device = packet.topic.split("/")[-2]
            body, props = self._canned[device]
            reply = packet.response_topic or f"{self._prefix}/dev/{device}/results"
            if len(self._in_flight) < self._receive_max:
                out.append(self._answer(reply, body, packet.correlation_data, props))
            else:
                self._waiting.append((reply, body, packet.correlation_data, props))
        elif isinstance(packet, mqtt5.PubAckPacket):
            self._in_flight.discard(packet.packet_id)
            while self._waiting and len(self._in_flight) < self._receive_max:
                out.append(self._answer(*self._waiting.popleft()))
        elif isinstance(packet, mqtt5.DisconnectPacket):
            return False
        return True

    def run(self) -> None:
        """Answer until the broker disconnects or closes the link."""
        buf = bytearray()
        need = 0  # bytes the packet at the head of buf needs; 0 = not known yet
        last_write = time.monotonic()
        while True:
            # A blocking read, no poll before it: what a responder close to the wire pays.
            data = self._sock.recv(_READ_SIZE)
            if not data:
                return
            buf += data
            if len(buf) < need:
                continue
            out: list[bytes] = []
            going = True
            with memoryview(buf) as view:
                used = 0
                while going and used < len(buf):
                    size = frame_length(view, used)
                    if size is None or used + size > len(buf):
                        need = size or 0
                        break
                    packet, n = mqtt5.read(view[used:used + size])
                    used += n
                    going = self.handle(packet, out)
                else:
                    need = 0
            del buf[:used]  # need, when set, is the length of the packet now at its head
            if self._ping_after is not None and time.monotonic() - last_write > self._ping_after:
                out.append(mqtt5.PingReqPacket().write())
            if out:
                self._sock.sendall(b"".join(out))
                last_write = time.monotonic()
            if not going:
                return


def _read_packet(sock: socket.socket, buf: bytearray) -> mqtt5.Packet:
    """The next whole packet (for the handshake, before the loop takes over)."""
    while True:
        try:
            with memoryview(buf) as view:
                packet, n = mqtt5.read(view)
        except IndexError:  # mqtt5's "Not enough bytes"
            data = sock.recv(_READ_SIZE)
            if not data:
                raise ConnectionError("the broker closed the connection") from None
            buf += data
            continue
        del buf[:n]
        return packet


def open_session(broker: str, client_id: str, topics: list[str]
                 ) -> tuple[socket.socket, mqtt5.ConnAckPacket]:
    """Connect, subscribe at QoS 1 to `topics`; the socket and the broker's CONNACK.

    No keep-alive is asked for (the reads block, with no timer beside them); a keep-alive
    the broker imposes (CONNACK's Server Keep Alive; mosquitto's is 65535 s) is kept by a
    PINGREQ with the first write after half of it: enough for a bench helper, never idle
    for long."""
    address = parse_broker_url(broker)
    sock = socket.create_connection((address.host, address.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    sock.sendall(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=0,
                                     receive_max=64).write())  # as the agent's session has it
    connack = _read_packet(sock, buf)
    if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
        raise ConnectionError(f"no session: {connack!r}")
    filters = [mqtt5.TopicFilter(t, max_qos=mqtt5.QoS.AT_LEAST_ONCE) for t in topics]
    sock.sendall(mqtt5.SubscribePacket(1, filters).write())
    suback = _read_packet(sock, buf)
    if not isinstance(suback, mqtt5.SubAckPacket) or any(int(c) >= 0x80 for c in suback.reason_codes):
        raise ConnectionError(f"subscription refused: {suback!r}")
    if buf:  # nothing is published to us before the SUBACK; keep to the simple loop
        raise ConnectionError(f"unexpected bytes after the SUBACK: {bytes(buf[:20])!r}")
    sock.settimeout(None)
    return sock, connack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="answer MQTT jobs with canned responses "
                                                 "(mqtt5 codec, raw socket, one thread)")
    parser.add_argument("broker")
    parser.add_argument("canned", type=Path, help="folder of <device>.body files")
    parser.add_argument("--prefix", default="edge/v1")
    args = parser.parse_args(argv)
    canned = load_canned(args.canned)
    topics = [f"{args.prefix}/dev/{device}/jobs" for device in canned]
    try:
        sock, connack = open_session(args.broker, f"bench-codec-echo-{id(canned):x}", topics)
    except (OSError, ConnectionError, ValueError) as exc:
        print(f"codec echo: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    print(READY, flush=True)
    echo = CodecEcho(sock, args.prefix, canned, connack.receive_max,
                     connack.server_keep_alive or 0)
    try:
        echo.run()
    except (_Stop, KeyboardInterrupt):
        with contextlib.suppress(OSError):
            sock.sendall(mqtt5.DisconnectPacket().write())
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
