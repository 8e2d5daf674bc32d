"""The agent's own encoding of a PUBLISH's properties equals paho's, byte for byte, and
paho decodes it back (paho's Properties is slow: agent/mqtt_session/)."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeinfer.contract.properties import PackedPublishProperties

CASES = [
    (b"corr-1", ()),
    (None, (("Inference-Header-Content-Length", "185"),)),
    (bytes(range(256)) * 3, (("k", "v"), ("ключ", "значение ✓"), ("", ""))),
    (b"", (("a", "b" * 300),)),
    (b"x" * 200, tuple((f"k{i}", str(i)) for i in range(40))),  # > 127 bytes: 2-byte varint
]


@pytest.mark.parametrize(("corr", "user"), CASES)
def test_same_bytes_as_paho_and_paho_reads_them(corr: bytes | None,
                                                 user: tuple[tuple[str, str], ...]) -> None:
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if corr is not None:
        theirs.CorrelationData = corr
    if user:
        theirs.UserProperty = list(user)
    ours = PackedPublishProperties(corr, user)
    assert ours.pack() == theirs.pack()  # type: ignore[no-untyped-call]
    back = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    back.unpack(ours.pack())  # type: ignore[no-untyped-call]
    assert getattr(back, "CorrelationData", None) == corr
    assert [tuple(p) for p in getattr(back, "UserProperty", [])] == list(user)
    assert "CorrelationData" in str(ours)


def test_response_topic_and_expiry_as_the_sdk_sends_them() -> None:
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.ResponseTopic = "edge/v1/reply/c-1/res"
    theirs.CorrelationData = b"\x01\x02"
    theirs.MessageExpiryInterval = 30
    theirs.UserProperty = [("model_name", "digits")]
    ours = PackedPublishProperties(b"\x01\x02", [("model_name", "digits")],
                                   response_topic="edge/v1/reply/c-1/res", expiry_s=30)
    assert ours.pack() == theirs.pack()  # type: ignore[no-untyped-call]


def test_a_property_over_65535_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="65535"):
        PackedPublishProperties(b"x" * 70_000)
