"""What the broker does with QoS 1 messages of a shared subscription when a member's session
ends: handed to another member, or dropped? Prints figures; not a test.

Two members of `$share/g/{topic}` on raw sockets (the `mqtt5` codec): `a` never acknowledges
anything, `b` acknowledges everything. Each case publishes N messages at QoS 1, ends `a`'s
link without a DISCONNECT (as a killed process does), waits, and counts what `b` got.

  python -m bench.probes.shared_session_end
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from pathlib import Path

import mqtt5

from edgeinfer.fleet.localbroker import Broker

TOPIC = "probe/pool/jobs"
Q1 = mqtt5.QoS.AT_LEAST_ONCE


class Member:
    """A raw MQTT v5 client on the shared subscription; counts the distinct messages."""

    def __init__(self, port: int, client_id: str, group: str, expiry: int, ack: bool,
                 receive_max: int = 1024, clean: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.ack = ack
        self.got: set[bytes] = set()
        self.disconnect: str | None = None
        self.sock.sendall(mqtt5.ConnectPacket(
            client_id, clean_start=clean, session_expiry_interval=expiry,
            receive_max=receive_max, keep_alive=60).write())
        share = mqtt5.TopicFilter(f"$share/{group}/{TOPIC}", max_qos=Q1)
        self.sock.sendall(mqtt5.SubscribePacket(1, [share]).write())
        self._buf = bytearray()
        self.subscribed = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        assert self.subscribed.wait(5)

    def _loop(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._buf += data
            while True:
                try:
                    packet, n = mqtt5.read(memoryview(bytes(self._buf)))
                except IndexError:
                    break
                del self._buf[:n]
                if isinstance(packet, mqtt5.SubAckPacket):
                    self.subscribed.set()
                elif isinstance(packet, mqtt5.PublishPacket):
                    self.got.add(packet.payload)
                    if self.ack and packet.packet_id:
                        with contextlib.suppress(OSError):  # closed by kill()
                            self.sock.sendall(mqtt5.PubAckPacket(packet.packet_id).write())
                elif isinstance(packet, mqtt5.DisconnectPacket):
                    self.disconnect = packet.reason_code.name

    def kill(self) -> None:
        """End the link as a killed process does: no DISCONNECT. shutdown() first: a bare
        close() while the reader thread sits in recv() sends no FIN on Linux."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def publish(port: int, tag: str, n: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(mqtt5.ConnectPacket(f"pub-{tag}", clean_start=True).write())
    for i in range(n):
        s.sendall(mqtt5.PublishPacket(TOPIC, f"{tag}-{i}".encode(), qos=Q1,
                                      packet_id=i % 65535 + 1).write())
    time.sleep(0.5)
    s.close()


def case(port: int, tag: str, expiry: int, *, kill_before: bool, wait_s: float,
         n: int = 100) -> str:
    # Each case has its own share group: members of earlier cases do not take a share.
    a = Member(port, f"a-{tag}", tag, expiry, ack=False, clean=True)
    b = Member(port, f"b-{tag}", tag, 0, ack=True)
    if kill_before:
        a.kill()
        time.sleep(0.3)
        publish(port, tag, n)
        a_got = 0
    else:
        publish(port, tag, n)
        time.sleep(0.5)
        a_got = len(a.got)
        a.kill()
    time.sleep(wait_s)
    b_got = len({p for p in b.got if p.startswith(tag.encode())})
    lost = n - b_got
    b.kill()
    return (f"{tag}: session expiry {expiry}s, a killed {'before' if kill_before else 'after'} "
            f"the publishes (a held {a_got} unacknowledged); after {wait_s:g}s b has "
            f"{b_got}/{n}: {lost} never reached a live member")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        try:
            print(f"mosquitto: {broker.exe}")
            print(case(broker.port, "inflight-expiry0", 0, kill_before=False, wait_s=2))
            print(case(broker.port, "inflight-expiry3", 3, kill_before=False, wait_s=6))
            print(case(broker.port, "queued-expiry3", 3, kill_before=True, wait_s=6))
            print(case(broker.port, "queued-expiry0", 0, kill_before=True, wait_s=2))
            print(case(broker.port, "inflight-expiry3-early", 3, kill_before=False, wait_s=1))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
