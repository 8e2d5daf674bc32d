"""Round trips through the broker, as a job takes them, for `edge-agent doctor`.

A broker that leaves Nagle's algorithm on (mosquitto's `set_tcp_nodelay false`, its
default and Debian's) holds each small packet it sends while an earlier one is unacknowledged,
and the receiver acknowledges only after its delayed-ACK timer (40 ms on Linux). A
closed-loop job (one in flight, QoS 1 both ways) then takes about 44 ms instead of about
0.1 ms here. Only the broker can turn that off: measured on mosquitto 2.0.11 over loopback,
TCP_QUICKACK re-armed after every read on the agent's socket alone left it at 44 ms; it
took QUICKACK on the job client's socket too (0.13 ms), which no job client sets
(docs/deploy.md, "The broker").

`measure_round_trips` plays both sides of a job on two connections made as the daemon makes
its own (same TLS, client certificate, credentials): a requester publishes QoS 1 on a private
topic under the device's own subtree, an echo answers QoS 1 on another, as the agent would.
`nagle_stall` is the rule that reads the figures; it is pure, so it is tested on its own.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeinfer.agent.config import BrokerConfig
from edgeinfer.agent.tls import security_from_config
from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.transport import TransportError, describe_connect_error

# The leaf under `{prefix}/dev/{device}/` that the probe uses and the agent never does;
# deploy/acl grants each device `readwrite` there.
PROBE_LEAF = "doctor"

# A stall is the round trip's median exceeding what the network explains by this much.
# Delayed-ACK timers are 40 ms or more (Linux: 40 ms minimum; Windows 200 ms; macOS 100 ms),
# and a held packet waits one of them: 44 ms measured here against 0.13 ms with
# `set_tcp_nodelay true`. Half the smallest timer leaves room for jitter on either side.
STALL_EXCESS_MS = 20.0

# mosquitto.conf(5): set_tcp_nodelay "applies globally", whatever listener it sits under.
# A reload (SIGHUP) did not apply it on mosquitto 2.0.11 here, not even to new connections.
FIX = ("the broker delays small packets (Nagle): set `set_tcp_nodelay true` in "
       "mosquitto.conf (a global option) and restart it")


class ProbeError(Exception):
    """The round trip could not be measured; the message says why, never a secret."""


@dataclass(frozen=True)
class RoundTrips:
    """Milliseconds per sample. `job_ms`: requester -> broker -> echo -> broker -> requester,
    QoS 1 both ways (two network round trips). `ping_ms`: a 1-byte QoS 0 message to the
    requester's own subscription (one network round trip, nothing for Nagle to hold)."""

    job_ms: tuple[float, ...]
    ping_ms: tuple[float, ...]

    @property
    def job_p50(self) -> float:
        return statistics.median(self.job_ms)

    @property
    def ping_p50(self) -> float:
        return statistics.median(self.ping_ms)

    @property
    def stalled(self) -> bool:
        return nagle_stall(self.job_ms, self.ping_ms)


def nagle_stall(job_ms: tuple[float, ...] | list[float],
                ping_ms: tuple[float, ...] | list[float]) -> bool:
    """Whether the QoS 1 round trips wait on delayed ACKs.

    A job's loop crosses the network twice (requester to broker and back, broker to echo and
    back; both ends of the probe are on this machine), a QoS 0 ping once. On a healthy broker
    the job's median is about twice the ping's, on any link. A broker holding small packets
    adds a delayed-ACK timer (>= 40 ms) to most jobs but not to the ping, which has no
    unacknowledged packet ahead of it. So: stalled when the job's median exceeds twice the
    ping's by STALL_EXCESS_MS or more. A slow link alone (ping 30 ms, job 60 ms) is not a stall.
    """
    if not job_ms or not ping_ms:
        return False
    return statistics.median(job_ms) - 2 * statistics.median(ping_ms) >= STALL_EXCESS_MS


def _set_nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    # As the daemon does (agent/mqtt_session/): our own Nagle must not be what is measured.
    # A TLS wrapper may not expose setsockopt; the broker's side is what the probe is after.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Link:
    """One paho MQTT v5 connection made as the daemon's, with blocking helpers."""

    def __init__(self, broker: BrokerConfig, timeout: float) -> None:
        self.timeout = timeout
        self.addr = parse_broker_url(broker.url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_socket_open = _set_nodelay
        self._connected = threading.Event()
        self._subacked = threading.Event()
        self._sub_codes: list[Any] = []
        self._connect_rc: Any = None
        self.on_payload: Callable[[str, bytes], None] = lambda topic, payload: None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        try:
            security = security_from_config(broker)
            security.apply(self.client, self.addr)
        except TransportError as exc:
            raise ProbeError(str(exc)) from None
        try:
            self.client.connect(self.addr.host, self.addr.port, keepalive=10)
        except (TimeoutError, OSError) as exc:
            raise ProbeError(f"unreachable ({describe_connect_error(exc)})") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise ProbeError(f"no CONNACK within {timeout}s")
        if self._connect_rc is None or self._connect_rc.is_failure:
            self.close()
            raise ProbeError(f"refused the connection ({self._connect_rc})")

    def _on_connect(self, c: Any, u: object, f: object, rc: Any, p: object) -> None:
        self._connect_rc = rc
        self._connected.set()

    def _on_subscribe(self, c: Any, u: object, mid: int, codes: list[Any], p: object) -> None:
        self._sub_codes = list(codes)
        self._subacked.set()

    def _on_message(self, c: Any, u: object, msg: Any) -> None:
        self.on_payload(msg.topic, msg.payload)

    def subscribe(self, topic: str, qos: int, acl_hint: str) -> None:
        self._subacked.clear()
        self.client.subscribe(topic, qos=qos)
        if not self._subacked.wait(self.timeout):
            raise ProbeError(f"no SUBACK for {topic} within {self.timeout}s")
        refused = [c for c in self._sub_codes if c.is_failure]
        if refused:
            raise ProbeError(f"the broker refused the subscription to {topic} ({refused[0]}); "
                             f"{acl_hint}")

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def measure_round_trips(broker: BrokerConfig, prefix: str, device_id: str, count: int = 10,
                        timeout: float = 3.0) -> RoundTrips:
    """`count` closed-loop QoS 1 jobs and `count` QoS 0 pings through the broker, one at a time,
    on a fresh topic `{prefix}/dev/{device_id}/doctor/{nonce}/...` that nothing else uses.
    Raises ProbeError when a connection, a subscription or an answer fails."""
    base = f"{prefix}/dev/{device_id}/{PROBE_LEAF}/{secrets.token_hex(6)}"
    job_topic, answer_topic, ping_topic = f"{base}/job", f"{base}/answer", f"{base}/ping"
    acl_hint = (f"an ACL must let the device read and write {prefix}/dev/{device_id}/"
                f"{PROBE_LEAF}/# (deploy/acl: pattern readwrite {prefix}/dev/%u/{PROBE_LEAF}/#)")
    echo = _Link(broker, timeout)
    try:
        requester = _Link(broker, timeout)
    except ProbeError:
        echo.close()
        raise
    try:
        arrived = threading.Event()
        def answer(_topic: str, payload: bytes) -> None:
            # As the agent answers a job: QoS 1, from paho's network thread.
            echo.client.publish(answer_topic, payload, qos=1)

        echo.on_payload = answer
        requester.on_payload = lambda topic, payload: arrived.set()
        echo.subscribe(job_topic, 1, acl_hint)
        requester.subscribe(answer_topic, 1, acl_hint)
        requester.subscribe(ping_topic, 0, acl_hint)

        def sample(topic: str, qos: int, what: str) -> float:
            arrived.clear()
            start = time.perf_counter()
            requester.client.publish(topic, b"x", qos=qos)
            if not arrived.wait(timeout):
                raise ProbeError(f"no {what} came back within {timeout}s (published on {topic}; "
                                 f"{acl_hint})")
            return (time.perf_counter() - start) * 1000.0

        jobs: list[float] = []
        pings: list[float] = []
        for _ in range(count):  # interleaved, so both see the same moments of the link
            jobs.append(sample(job_topic, 1, "QoS 1 answer"))
            pings.append(sample(ping_topic, 0, "QoS 0 ping"))
        return RoundTrips(tuple(jobs), tuple(pings))
    finally:
        requester.close()
        echo.close()


def doctor_lines(broker: BrokerConfig, prefix: str, device_id: str,
                 count: int = 10) -> tuple[bool, list[str]]:
    """What `edge-agent doctor` prints about the round trip, and False on a stall.

    A round trip that cannot be measured (an ACL without the probe's topic, say) is said
    but is not a failure: the broker answered, which doctor has already checked."""
    addr = parse_broker_url(broker.url)
    try:
        trips = measure_round_trips(broker, prefix, device_id, count)
    except ProbeError as exc:
        return True, [f"broker {addr}: round trip not measured: {exc}"]
    line = (f"broker {addr}: job round trip p50 {trips.job_p50:.1f} ms "
            f"(QoS 1 both ways, {len(trips.job_ms)} jobs, one in flight; "
            f"QoS 0 ping p50 {trips.ping_p50:.1f} ms)")
    if trips.stalled:
        return False, [line, f"  ! {FIX}"]
    return True, [line]
