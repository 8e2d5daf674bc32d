"""Bytes on the agent's MQTT link: opening the socket, framing packets, salvaging a packet
the codec refuses.

`mqtt5` (a sans-I/O MQTT v5 codec in Rust) parses and writes every packet; `mqtt5.read`
raises IndexError while a packet is incomplete, and ValueError (or pyo3's PanicException,
a BaseException, for invalid UTF-8) when it cannot read one. What it leaves to us is here:

- `frame_length` finds where a packet ends from its fixed header alone, so a packet the
  codec refuses is skipped whole and the stream stays in step;
- `salvage_publish` reads what it can of a refused PUBLISH (QoS, packet id, topic,
  Response Topic, Correlation Data, User Properties, payload), each field on its own, so the
  session can still acknowledge it and the job can be answered;
- `publish_head` reads a PUBLISH's variable header (topic, packet id, properties) from its
  first bytes, so that the session can refuse a PUBLISH over its route's size limit without
  holding its payload;
- `salvage_ack` reads the packet id and reason code of a refused PUBACK or SUBACK;
- `open_socket` dials the broker, sets TCP_NODELAY and does the TLS handshake.

Nothing here keeps state; `agent/mqtt_session/` owns the session.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from edgeinfer.contract.brokerurl import BrokerAddress

PACKET_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}


class FrameError(ValueError):
    """The stream cannot be framed any more (a Remaining Length over 4 bytes)."""


def frame_length(buf: bytes | bytearray | memoryview, pos: int) -> int | None:
    """Bytes of the packet that starts at `buf[pos]`, fixed header included; None while its
    fixed header has not all arrived. Raises FrameError on a Remaining Length that is not
    a Variable Byte Integer of at most 4 bytes."""
    end = len(buf)
    value = 0
    shift = 0
    i = pos + 1
    for _ in range(4):
        if i >= end:
            return None
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (i - pos) + value
        shift += 7
    raise FrameError("a packet's Remaining Length is longer than 4 bytes")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(4):
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    raise ValueError("Variable Byte Integer longer than 4 bytes")


@dataclass
class Salvaged:
    """What could be read of a PUBLISH the codec refused. `problems` says what could not."""

    qos: int
    retain: bool
    packet_id: int = 0  # 0: QoS 0, or not readable
    topic: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    expiry_s: int | None = None
    payload: bytes | None = None
    problems: tuple[str, ...] = ()


# Property identifier -> how its value is laid out (MQTT 5, 2.2.2.2), for a PUBLISH.
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PUBLISH_PROPERTIES = {
    0x01: ("Payload Format Indicator", _BYTE),
    0x02: ("Message Expiry Interval", _U32),
    0x03: ("Content Type", _UTF8),
    0x08: ("Response Topic", _UTF8),
    0x09: ("Correlation Data", _BINARY),
    0x0B: ("Subscription Identifier", _VARINT),
    0x23: ("Topic Alias", _U16),
    0x26: ("User Property", _PAIR),
}


def _string(data: bytes, i: int, what: str, problems: list[str]) -> tuple[str | None, int]:
    n = int.from_bytes(data[i:i + 2], "big")
    raw = data[i + 2:i + 2 + n]
    if len(raw) != n:
        raise ValueError(f"{what} runs past the end of the packet")
    try:
        return raw.decode("utf-8"), i + 2 + n
    except UnicodeDecodeError as exc:
        problems.append(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return None, i + 2 + n


def salvage_publish(packet: bytes) -> Salvaged:
    """Read a PUBLISH field by field, keeping whatever is readable (never raises)."""
    flags = packet[0] & 0x0F
    out = Salvaged(qos=(flags >> 1) & 0x03, retain=bool(flags & 0x01))
    problems: list[str] = []
    try:
        _, i = _varint(packet, 1)
        out.topic, i = _string(packet, i, "the topic", problems)
        if out.qos:
            out.packet_id = int.from_bytes(packet[i:i + 2], "big")
            i += 2
        props_len, i = _varint(packet, i)
        props_end = i + props_len
        if props_end > len(packet):
            raise ValueError("the properties run past the end of the packet")
        user: list[tuple[str, str]] = []
        try:
            while i < props_end:
                ident = packet[i]
                i += 1
                name, kind = _PUBLISH_PROPERTIES.get(ident, ("", -1))
                if kind == _BYTE:
                    i += 1
                elif kind == _U16:
                    i += 2
                elif kind == _U32:
                    out.expiry_s = int.from_bytes(packet[i:i + 4], "big")
                    i += 4
                elif kind == _VARINT:
                    _, i = _varint(packet, i)
                elif kind == _BINARY:
                    n = int.from_bytes(packet[i:i + 2], "big")
                    out.correlation_data = packet[i + 2:i + 2 + n]
                    i += 2 + n
                elif kind == _UTF8:
                    value, i = _string(packet, i, name, problems)
                    if ident == 0x08:
                        out.response_topic = value
                elif kind == _PAIR:
                    key, i = _string(packet, i, f"User Property {len(user) + 1} (name)", problems)
                    value, i = _string(packet, i, f"User Property {len(user) + 1} (value)",
                                       problems)
                    if key is not None and value is not None:
                        user.append((key, value))
                else:
                    # Its length is unknown: the properties after it cannot be read.
                    problems.append(f"unknown property identifier 0x{ident:02x}")
                    break
        except (ValueError, IndexError) as exc:
            problems.append(f"the properties cannot be read: {exc}")
        out.user_properties = tuple(user)
        out.payload = packet[props_end:]
    except (ValueError, IndexError) as exc:
        problems.append(str(exc))
    out.problems = tuple(problems)
    return out


# The most bytes of a PUBLISH held to read its variable header (topic and properties) when
# its payload may be over a route's limit: a topic is at most 65,537 bytes on the wire, and
# a job's properties (Response Topic, Correlation Data, a few User Properties) are small.
# Also the room a broker's max_packet_size leaves beside jobs.max_message_bytes.
PUBLISH_HEAD_MAX = 128 * 1024


def publish_head(data: bytes) -> tuple[Salvaged, int] | None:
    """The variable header of the PUBLISH that `data` starts with (fixed header included),
    and where its payload starts; None while `data` does not hold all of it yet. Fields
    that cannot be read are in `problems`, as `salvage_publish` gives them; `payload` is
    None. A variable header that cannot be framed ends at len(data)."""
    qos = (data[0] >> 1) & 0x03
    try:
        _, i = _varint(data, 1)
        if i + 2 > len(data):
            return None
        i += 2 + int.from_bytes(data[i:i + 2], "big") + (2 if qos else 0)
        if i >= len(data):
            return None
        props_len, i = _varint(data, i)
        end = i + props_len
    except IndexError:
        return None
    except ValueError:
        end = len(data)
    if end > len(data):
        return None
    head = salvage_publish(bytes(data[:end]))
    head.payload = None
    return head, end


def salvage_ack(packet: bytes) -> tuple[int, int] | None:
    """(packet id, first reason code) of a PUBACK/PUBREC/SUBACK whose rest is unreadable."""
    try:
        _, i = _varint(packet, 1)
    except (ValueError, IndexError):
        return None
    if len(packet) < i + 2:
        return None
    pid = int.from_bytes(packet[i:i + 2], "big")
    if packet[0] >> 4 == 9:  # SUBACK: the reason codes follow the properties
        try:
            n, j = _varint(packet, i + 2)
            return pid, packet[j + n]
        except (ValueError, IndexError):
            return pid, 0x80
    return pid, packet[i + 2] if len(packet) > i + 2 else 0


def open_socket(addr: BrokerAddress, context: ssl.SSLContext | None, timeout: float) -> socket.socket:
    """A connected (blocking, `timeout`) socket to the broker, TLS handshake done when
    `context` is given. TCP_NODELAY: small QoS 1 packets otherwise wait on delayed ACKs."""
    sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            # The context checks the certificate against the host name (or against
            # broker.tls.server_name, edgeinfer/contract/transport.py); the handshake runs under `timeout`.
            sock = context.wrap_socket(sock, server_hostname=addr.host)
    except BaseException:
        sock.close()
        raise
    return sock
