"""The agent's MQTT session on the mqtt5 codec, packet by packet.

A scripted broker on a raw socket (as paho's own tests do) checks exact packets: Receive
Maximum, resends with DUP, half-open links, DISCONNECT reasons, packets the codec refuses.
A real mosquitto checks the rest: publish, PUBACK, manual acknowledgement.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mqtt5
import pytest

from bench.models import build_digits_float
from edgeinfer.agent import mqtt_session as session_mod
from edgeinfer.agent.config import BrokerConfig
from edgeinfer.agent.mqtt_session import Inbound, Retained, Route
from edgeinfer.agent.mqtt_wire import frame_length, salvage_publish
from edgeinfer.contract.topics import Topics
from tests.broker import Broker
from tests.helpers import PREFIX, deploy, job_body, running_agent

MqttSession = session_mod.MqttSession
QOS1 = mqtt5.QoS.AT_LEAST_ONCE


def _cfg(url: str, keepalive: int = 30) -> BrokerConfig:
    return BrokerConfig(url=url, keepalive_s=keepalive, reconnect_min_s=0.05,
                        reconnect_max_s=0.2, connect_timeout_s=3)


def _session(url: str, routes: list[Route], keepalive: int = 30,
             published: list[tuple[int, bool]] | None = None,
             events: list[tuple[str, dict[str, object]]] | None = None,
             ) -> session_mod.MqttSession:
    sink = published if published is not None else []
    seen = events if events is not None else []
    return MqttSession("wire-test", _cfg(url, keepalive), routes,
                       Retained("t/wire/state", b"offline"), lambda: None,
                       lambda mid, failed: sink.append((mid, failed)),
                       lambda kind, fields: seen.append((kind, fields)))


# --- a scripted broker ----------------------------------------------------------------------


class Link:
    """One accepted connection of the scripted broker: read packets, write bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.buf = bytearray()

    def packet(self, timeout: float = 5.0) -> tuple[mqtt5.Packet, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            n = frame_length(self.buf, 0) if self.buf else None
            if n is not None and len(self.buf) >= n:
                raw = bytes(self.buf[:n])
                del self.buf[:n]
                return mqtt5.read(memoryview(raw))[0], raw
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("client closed")
            self.buf += data

    def expect(self, kind: type, timeout: float = 5.0) -> tuple[mqtt5.Packet, bytes]:
        while True:
            packet, raw = self.packet(timeout)
            if isinstance(packet, kind):
                return packet, raw
            if not isinstance(packet, mqtt5.PingReqPacket):
                raise AssertionError(f"wanted {kind.__name__}, got {packet!r}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, *, present: bool = False, receive_max: int = 65535,
                  keepalive: int | None = None) -> mqtt5.ConnectPacket:
        connect, _ = self.expect(mqtt5.ConnectPacket)
        assert isinstance(connect, mqtt5.ConnectPacket)
        self.send(mqtt5.ConnAckPacket(session_present=present, receive_max=receive_max,
                                      server_keep_alive=keepalive).write())
        sub, _ = self.expect(mqtt5.SubscribePacket)
        assert isinstance(sub, mqtt5.SubscribePacket)
        self.send(mqtt5.SubAckPacket(sub.packet_id, [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE]
                                     * len(sub.topic_filters)).write())
        return connect


class Scripted:
    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self.server.getsockname()[1]}"
        self.server.settimeout(5)

    def accept(self) -> Link:
        sock, _ = self.server.accept()
        return Link(sock)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    s = Scripted()
    try:
        yield s
    finally:
        s.close()


def _publish(topic: str, pid: int, payload: bytes = b"x", **kw: object) -> bytes:
    return mqtt5.PublishPacket(topic, payload, qos=QOS1, packet_id=pid, **kw).write()  # type: ignore[arg-type]


# --- tests ----------------------------------------------------------------------------------


def test_connect_asks_for_a_persistent_session_with_a_retained_will(scripted: Scripted) -> None:
    s = _session(scripted.url, [Route("t/jobs", 1, lambda m: None)], keepalive=7)
    s.start()
    try:
        link = scripted.accept()
        connect = link.handshake()
        assert connect.client_id == "wire-test" and not connect.clean_start
        assert connect.keep_alive == 7 and connect.session_expiry_interval == 3600
        assert connect.receive_max == session_mod.RECEIVE_MAXIMUM
        assert connect.will is not None and connect.will.retain
        assert connect.will.qos == QOS1 and connect.will.payload == b"offline"
        assert s.subscribed.wait(5) and s.connect_count == 1
    finally:
        s.stop()


def test_broker_receive_maximum_holds_publishes_back(scripted: Scripted) -> None:
    published: list[tuple[int, bool]] = []
    s = _session(scripted.url, [Route("t/jobs", 1, lambda m: None)], published=published)
    s.start()
    try:
        link = scripted.accept()
        link.handshake(receive_max=2)
        assert s.subscribed.wait(5)
        infos = [s.publish("t/out", f"m{i}".encode()) for i in range(5)]
        first = [link.expect(mqtt5.PublishPacket)[0] for _ in range(2)]
        with pytest.raises(TimeoutError):
            link.packet(timeout=0.3)  # a third would exceed the broker's Receive Maximum
        for p in first:
            assert isinstance(p, mqtt5.PublishPacket) and p.packet_id is not None
            link.send(mqtt5.PubAckPacket(p.packet_id).write())
        rest = [link.expect(mqtt5.PublishPacket)[0] for _ in range(2)]
        assert [p.payload for p in first + rest] == [b"m0", b"m1", b"m2", b"m3"]  # type: ignore[union-attr]
        assert infos[0].wait_for_publish(2) and infos[1].wait_for_publish(2)
        assert not infos[4].is_published()
        ids = [i.mid for i in infos]
        assert len(set(ids)) == 5 and all(1 <= i <= 65535 for i in ids)
        assert sorted(published) == sorted((i, False) for i in ids[:2])
    finally:
        s.stop()


@pytest.mark.parametrize("present", [True, False])
def test_unacknowledged_publishes_are_sent_again_after_a_reconnect(
    scripted: Scripted, present: bool
) -> None:
    s = _session(scripted.url, [Route("t/jobs", 1, lambda m: None)])
    s.start()
    try:
        link = scripted.accept()
        link.handshake()
        assert s.subscribed.wait(5)
        info = s.publish("t/out", b"answer", correlation_data=b"c1",
                         user_properties=[("k", "v")])
        first, raw = link.expect(mqtt5.PublishPacket)
        assert raw[0] & 0x08 == 0
        link.sock.close()  # no PUBACK: the link dies
        link = scripted.accept()
        link.handshake(present=present)
        again, raw = link.expect(mqtt5.PublishPacket)
        assert isinstance(again, mqtt5.PublishPacket) and isinstance(first, mqtt5.PublishPacket)
        assert again.packet_id == first.packet_id == info.mid
        assert (again.payload, again.correlation_data, again.user_properties) == (
            b"answer", b"c1", [("k", "v")])
        assert bool(raw[0] & 0x08) is present  # DUP only where the broker kept the session
        link.send(mqtt5.PubAckPacket(info.mid).write())
        assert info.wait_for_publish(2)
        assert s.connect_count == 2
    finally:
        s.stop()


def test_a_half_open_link_is_dropped_and_reconnected(scripted: Scripted) -> None:
    s = _session(scripted.url, [Route("t/jobs", 1, lambda m: None)], keepalive=1)
    s.start()
    try:
        link = scripted.accept()
        link.handshake()
        t0 = time.monotonic()
        link.expect(mqtt5.PingReqPacket, timeout=3)  # nothing sent for keepalive seconds
        # ... and no PINGRESP: after 1.5 x keepalive without a packet the session redials.
        again = scripted.accept()
        assert 1.2 < time.monotonic() - t0 < 4
        again.handshake()
        assert s.subscribed.wait(5) and s.connect_count == 2
        assert s.last_disconnect is not None and "half-open" in s.last_disconnect
    finally:
        s.stop()


def test_disconnect_reason_is_kept(scripted: Scripted) -> None:
    events: list[tuple[str, dict[str, object]]] = []
    s = _session(scripted.url, [Route("t/jobs", 1, lambda m: None)], events=events)
    s.start()
    try:
        link = scripted.accept()
        link.handshake()
        assert s.subscribed.wait(5)
        link.send(mqtt5.DisconnectPacket(
            reason_code=mqtt5.DisconnectReasonCode.ADMINISTRATIVE_ACTION,
            reason_str="maintenance").write())
        scripted.accept().handshake()
        assert s.last_disconnect is not None
        assert "Administrative action (0x98): maintenance" in s.last_disconnect
        # And an event says so, with the broker's reason code and string.
        disconnects = [f for kind, f in events if kind == "broker_disconnected"]
        assert len(disconnects) == 1
        assert "Administrative action (0x98): maintenance" in str(disconnects[0]["reason"])
    finally:
        s.stop()


def _bad_utf8_publish(topic: str, pid: int, response_topic: str) -> bytes:
    """A QoS 1 PUBLISH whose user property name is not UTF-8 (the codec refuses it)."""
    good = _publish(topic, pid, b'{"id": "bad-1"}', response_topic=response_topic,
                    user_properties=[("kk", "v")])
    i = good.index(b"kk")
    return good[:i] + b"\xff" + good[i + 1:]


@pytest.mark.parametrize("takes", [False, True])
def test_a_packet_the_codec_refuses_is_skipped_acknowledged_and_handed_over(
    scripted: Scripted, takes: bool
) -> None:
    got: queue.Queue[Inbound] = queue.Queue()
    sessions: list[session_mod.MqttSession] = []

    def handler(m: Inbound) -> None:
        got.put(m)
        sessions[0].ack(m.mid, m.qos)

    events: list[tuple[str, dict[str, object]]] = []
    s = _session(scripted.url, [Route("t/jobs", 1, handler, takes_unreadable=takes)],
                 events=events)
    sessions.append(s)
    s.start()
    try:
        link = scripted.accept()
        link.handshake()
        assert s.subscribed.wait(5)
        # Refused packet, then a good one, in one write.
        link.send(_bad_utf8_publish("t/jobs", 7, "r/1") + _publish("t/jobs", 8, b"good"))
        acks = {link.expect(mqtt5.PubAckPacket)[0].packet_id for _ in range(2)}  # type: ignore[union-attr]
        assert acks == {7, 8}
        first = got.get(timeout=2)
        if takes:
            assert first.unreadable is not None and "not valid UTF-8" in first.unreadable
            assert first.response_topic == "r/1" and first.payload == b'{"id": "bad-1"}'
            first = got.get(timeout=2)
        assert first.payload == b"good" and first.unreadable is None
        assert got.empty() and s.connect_count == 1 and s.connected.is_set()
        assert s.unreadable == 1
        assert [kind for kind, _ in events] == ["mqtt_packet_unreadable"]
        assert events[0][1]["packet"] == "PUBLISH" and "UTF-8" in str(events[0][1]["reason"])
    finally:
        s.stop()


def test_salvage_reads_what_it_can() -> None:
    raw = _bad_utf8_publish("t/jobs", 9, "r/2")
    s = salvage_publish(raw)
    assert (s.qos, s.packet_id, s.topic, s.response_topic) == (1, 9, "t/jobs", "r/2")
    assert s.payload == b'{"id": "bad-1"}' and s.user_properties == ()
    assert any("User Property 1 (name)" in p for p in s.problems)


# --- a real broker --------------------------------------------------------------------------


def test_publish_ack_and_receive_through_mosquitto(broker: Broker) -> None:
    got: queue.Queue[Inbound] = queue.Queue()
    published: list[tuple[int, bool]] = []
    s = _session(broker.url, [Route("t/wire/in", 1, got.put)], published=published)
    s.start()
    try:
        assert s.subscribed.wait(5)
        done = threading.Event()
        # Loop back: our own publish comes back on our subscription.
        info = s.publish("t/wire/in", b"hello\xef\xbb\xbf", correlation_data=b"c",
                         user_properties=[("\ufeffk", "v\ufeff")])
        assert info.wait_for_publish(5) and (info.mid, False) in published
        m = got.get(timeout=5)
        assert (m.payload, m.correlation_data, m.user_properties) == (
            b"hello\xef\xbb\xbf", b"c", (("\ufeffk", "v\ufeff"),))
        assert m.qos == 1 and m.mid & 0xFFFF
        s.ack(m.mid, m.qos)
        done.set()
        assert s.publish("t/wire/q0", b"x", qos=0).rc == 0
    finally:
        s.stop()


# --- a real agent: jobs whose properties hold U+FEFF ----------------------------------------


class RawClient:
    """A job client on a raw socket: PUBLISH bytes written with mqtt5 (paho refuses U+FEFF
    in properties), answers read with mqtt5 and acknowledged."""

    def __init__(self, url: str, client_id: str, subscription: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.link = Link(socket.create_connection((host, int(port)), timeout=5))
        self.link.send(mqtt5.ConnectPacket(client_id, clean_start=True, keep_alive=60).write())
        self.link.expect(mqtt5.ConnAckPacket)
        self.link.send(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(subscription, max_qos=QOS1)])
                       .write())
        self.link.expect(mqtt5.SubAckPacket)
        self.answers: dict[bytes, list[dict[str, object]]] = {}
        self._cond = threading.Condition()
        self._write = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def publish(self, topic: str, payload: bytes, pid: int, **props: object) -> None:
        with self._write:
            self.link.send(_publish(topic, pid, payload, **props))

    def _read(self) -> None:
        while not self._closed:
            try:
                packet, _ = self.link.packet(timeout=1.0)
            except TimeoutError:
                continue
            except (EOFError, OSError):
                return
            if isinstance(packet, mqtt5.PublishPacket):
                if packet.packet_id:
                    with self._write:
                        self.link.send(mqtt5.PubAckPacket(packet.packet_id).write())
                with self._cond:
                    key = packet.correlation_data or b""
                    self.answers.setdefault(key, []).append(json.loads(packet.payload))
                    self._cond.notify_all()

    def wait(self, n: int, timeout: float) -> dict[bytes, list[dict[str, object]]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.answers) >= n, timeout), (
                f"{len(self.answers)} of {n} answered: {sorted(self.answers)}")
            return dict(self.answers)

    def close(self) -> None:
        self._closed = True
        self.link.sock.close()


def test_jobs_with_a_bom_in_their_properties_keep_the_agent_connected(tmp_path: Path) -> None:
    """U+FEFF is legal in MQTT 5 strings. paho dropped the link on such a job, never
    acknowledged it, and the broker sent it again on every reconnect: the device stayed
    offline for good. Now each is answered and the session stays up."""
    model = build_digits_float(tmp_path / "models")
    device = "gw-bom"
    topics = Topics(PREFIX, device)
    reply = f"{PREFIX}/reply/bom"
    with running_agent(tmp_path, device) as (broker, agent):
        assert deploy(broker.url, tmp_path, "--model", "digits", "--version", "1",
                      "--file", str(model.path), "--prefer", "onnxruntime", "--wait", "60",
                      device=device) == 0
        client = RawClient(broker.url, "bom-client", f"{reply}/#")
        try:
            def body(i: int) -> bytes:
                return job_body(f"j-{i}", "digits", {"x": model.x_test[i:i + 1]})

            odd: list[dict[str, object]] = [
                {"user_properties": [("\ufeffnote", "v\ufeff")], "response_topic": f"{reply}/r"},
                {"response_topic": f"{reply}/\ufeffr"},
                {"content_type": "\ufeffapplication/json", "response_topic": f"{reply}/r"},
            ]
            for i, props in enumerate(odd):
                client.publish(topics.jobs, body(i), 100 + i, correlation_data=b"c%d" % i,
                               **props)
            for i in range(len(odd), len(odd) + 10):
                client.publish(topics.jobs, body(i), 100 + i, correlation_data=b"c%d" % i,
                               response_topic=f"{reply}/r")
            got = client.wait(13, timeout=30)
            time.sleep(0.5)  # room for a repeat to show up
            for i in range(13):
                answers = client.answers[b"c%d" % i]
                assert len(answers) == 1, answers
                assert answers[0]["id"] == f"j-{i}" and "outputs" in answers[0], answers[0]
            assert len(got) == 13
            log = agent.log_text()
            assert log.count("connected to") == 1, log
            assert "lost; reconnecting" not in log
        finally:
            client.close()
