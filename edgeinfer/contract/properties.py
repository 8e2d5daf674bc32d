"""`PackedPublishProperties`: a paho PUBLISH's properties encoded once, for the operator
side's paho clients (fleet/sync_client.py, bench/echo.py). The agent's own session does not use
paho (agent/mqtt_session/, on mqtt5, which only the agent extras install): this module
needs paho alone, so the job client imports it on the base install."""

from __future__ import annotations

from collections.abc import Sequence

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


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
