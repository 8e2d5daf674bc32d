"""edgeinfer.fleet.mqtt: connecting, acknowledged publishes, reading retained messages."""

from __future__ import annotations

import time

import pytest

from edgeinfer.fleet.mqtt import BrokerError, connect, read_retained
from tests.broker import Broker, free_port


def test_unreachable_broker_says_where() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match=rf"^cannot reach broker {url}: .*refused"):
        connect(url, timeout_s=1)


def test_bad_url() -> None:
    with pytest.raises(BrokerError, match="must start with mqtt://"):
        connect("http://127.0.0.1:1883")


def test_silent_broker_times_out(broker: Broker) -> None:
    broker.freeze()  # accepts TCP (kernel backlog) but never answers CONNECT
    try:
        started = time.monotonic()
        with pytest.raises(BrokerError, match=r"no answer to CONNECT within 0\.5s"):
            connect(broker.url, timeout_s=0.5)
        assert time.monotonic() - started < 2
    finally:
        broker.thaw()


def test_read_retained(broker: Broker) -> None:
    with connect(broker.url) as conn:
        for dev in ("a", "b"):
            conn.publish(f"t/dev/{dev}/state", dev.encode(), retain=True).result(2)
        conn.publish("t/dev/c/state", b"gone", retain=True).result(2)
        conn.publish("t/dev/c/state", b"", retain=True).result(2)  # deleted
        conn.publish("t/dev/a/other", b"x", retain=True).result(2)
    got = read_retained(broker.url, "t/dev/+/state", quiet_s=0.1)
    assert got == {"t/dev/a/state": b"a", "t/dev/b/state": b"b"}
    # Exact topics return as soon as each has answered, without waiting to be quiet.
    started = time.monotonic()
    got = read_retained(broker.url, ["t/dev/a/state", "t/dev/a/other"], quiet_s=2)
    assert got == {"t/dev/a/state": b"a", "t/dev/a/other": b"x"}
    assert time.monotonic() - started < 1.5
    assert read_retained(broker.url, "t/none", quiet_s=0.1) == {}


def test_publish_resolves_on_puback(broker: Broker) -> None:
    with connect(broker.url) as conn:
        futures = [conn.publish("t/x", b"%d" % i, qos=1) for i in range(200)]
        for f in futures:
            assert f.result(5) is None
        assert conn.publish("t/x", b"q0", qos=0).result(5) is None
