"""The outbox against a real broker: bounded, back-pressuring, and emptied only by PUBACKs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeinfer.agent.journal import Journal, OutMessage
from edgeinfer.agent.outbox import OutboxPublisher
from tests.broker import Broker


def test_full_outbox_holds_workers_back_until_the_broker_acknowledges(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    journal = Journal(tmp_path / "journal.sqlite3")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="outbox-test",
                         protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect("127.0.0.1", broker.port, keepalive=60)
    client.loop_start()
    assert connected.wait(5)

    def publish(msg: OutMessage) -> Any:
        return client.publish(msg.topic, msg.payload, qos=msg.qos)

    outbox = OutboxPublisher(journal, publish, connected, lambda: 2**20, window=8,
                             max_messages=5, max_bytes=10**6)
    client.on_publish = lambda c, u, mid, rc, p: outbox.on_published(mid, rc.is_failure)
    outbox.start()
    try:
        broker.freeze()  # it takes the packets but acknowledges none of them
        for i in range(5):
            payload = f"answer {i}".encode()
            journal.enqueue("edge/v1/dev/x/results", payload)
            outbox.added(len(payload))
        assert not outbox.has_room()
        assert not outbox.wait_room(1.0)  # a worker waits: the policy is backpressure
        assert journal.outbox_stats()[0] == 5  # nothing is forgotten without a PUBACK
        broker.thaw()
        assert outbox.wait_room(10.0)
        assert outbox.drain(10.0)
        assert journal.outbox_stats() == (0, 0)
    finally:
        broker.thaw()
        outbox.stop()
        client.loop_stop()
        client.disconnect()
        journal.close()
        broker.stop()


def test_outbox_left_by_a_crash_is_sent_after_restart(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    for i in range(3):
        journal.enqueue("edge/v1/dev/x/results", f"answer {i}".encode())
    journal.close()
    broker = Broker(tmp_path / "broker")
    broker.start()
    got: list[bytes] = []
    arrived = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        got.append(bytes(m.payload))
        if len(got) == 3:
            arrived.set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("edge/v1/dev/x/results", qos=1)
    sub.loop_start()
    reopened = Journal(tmp_path / "journal.sqlite3")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    pub.on_connect = lambda c, u, f, rc, p: connected.set()
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    assert connected.wait(5)
    outbox = OutboxPublisher(reopened, lambda m: pub.publish(m.topic, m.payload, qos=1),
                             connected, lambda: 2**20)
    pub.on_publish = lambda c, u, mid, rc, p: outbox.on_published(mid, rc.is_failure)
    outbox.start()
    try:
        assert arrived.wait(10)
        assert got == [b"answer 0", b"answer 1", b"answer 2"]  # in order
        assert outbox.drain(10.0)
    finally:
        outbox.stop()
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()
        reopened.close()
        broker.stop()
