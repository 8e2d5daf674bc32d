"""Simulated devices run in groups, each group on one network thread (`SocketMux`), and
the `Simulator` that spreads N devices over `--threads` groups.

`DeviceGroup` is each device's MQTT session: it connects it (spaced by `connect_rate`,
again after a loss with jittered exponential backoff), announces it (`online` state and
retained `reported` on every connect), schedules its telemetry, hands it its desired
manifests, and on stop says `offline` (retained, as an agent that stops does) and
disconnects cleanly.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeinfer.contract.brokerurl import BrokerAddress, parse_broker_url
from edgeinfer.contract.topics import Topics
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.simulator.device import SimConfig, SimDevice, SimStats, simulated_hardware
from edgeinfer.fleet.simulator.sockmux import SocketMux

log = logging.getLogger(__name__)


class DeviceGroup:
    """Devices sharing one network thread; every callback below runs on it."""

    def __init__(self, index: int, cfg: SimConfig, address: BrokerAddress, ids: list[str],
                 stats: SimStats, ssl_context: ssl.SSLContext | None) -> None:
        self.cfg = cfg
        self.address = address
        self.stats = stats
        # Simulated figures, not secrets.
        self.rng = random.Random(None if cfg.seed is None else cfg.seed + index)  # noqa: S311
        self.mux = SocketMux(f"sim-net-{index}", on_stop=self._shutdown)
        self._stopping = False
        self.devices = [self._device(dev, ssl_context) for dev in ids]

    @property
    def thread(self) -> threading.Thread:
        return self.mux.thread

    def _device(self, device_id: str, ssl_context: ssl.SSLContext | None) -> SimDevice:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=device_id, protocol=paho.MQTTv5)
        d = SimDevice(device_id, Topics(self.cfg.prefix, device_id), self, client,
                      simulated_hardware(self.rng))
        if ssl_context is not None:
            client.tls_set_context(ssl_context)
        security = self.cfg.security
        if security is not None and security.username is not None:
            client.username_pw_set(security.username, security.password.reveal()
                                   if security.password is not None else None)
        client.will_set(d.topics.state, d.state_payload("offline"), qos=1, retain=True)
        client.user_data_set(d)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.mux.attach(client)
        return d

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run `fn` on this group's network thread in `delay_s` seconds."""
        self.mux.after(delay_s, fn)

    # -- MQTT callbacks -----------------------------------------------------------------

    def _on_connect(self, client: paho.Client, d: SimDevice, _flags: paho.ConnectFlags,
                    reason_code: ReasonCode, _props: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("broker refused %s: %s", d.device_id, reason_code)
            return
        d.connected, d.attempt = True, 0
        self.stats.connected += 1
        self.stats.connects += 1
        client.subscribe(d.topics.desired, qos=1)
        d.publish(d.topics.state, d.state_payload("online"), retain=True)
        d.publish_reported()

    def _on_disconnect(self, _client: paho.Client, d: SimDevice, _flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, _props: Properties | None) -> None:
        if d.connected:
            self.stats.connected -= 1
            self.stats.disconnects += 1
        d.connected = False
        if not self._stopping:
            log.info("%s lost the broker: %s", d.device_id, reason_code)
            self._schedule_connect(d)

    def _on_message(self, _client: paho.Client, d: SimDevice, msg: paho.MQTTMessage) -> None:
        if msg.topic == d.topics.desired:
            d.on_desired(bytes(msg.payload))

    # -- connecting ---------------------------------------------------------------------

    def _schedule_connect(self, d: SimDevice) -> None:
        d.attempt += 1
        delay = self.rng.uniform(0, min(30.0, 0.5 * 2 ** min(d.attempt, 6)))
        self.after(delay, lambda: self._connect(d))

    def _connect(self, d: SimDevice) -> None:
        if self._stopping or d.connected:
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        try:
            d.client.connect(self.address.host, self.address.port, self.cfg.keepalive_s,
                             clean_start=True, properties=props)
        except (OSError, ssl.SSLError) as exc:
            log.info("%s cannot connect to %s: %s", d.device_id, self.address, exc)
            self._schedule_connect(d)

    def _telemetry(self, d: SimDevice) -> None:
        if self._stopping:
            return
        doc = d.telemetry()
        if d.connected:
            d.publish(d.topics.telemetry, doc, qos=0)
            self.stats.telemetry_sent += 1
        self.after(self.cfg.report_every_s, lambda: self._telemetry(d))

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        spacing = 1.0 / self.cfg.connect_rate if self.cfg.connect_rate > 0 else 0.0
        for i, d in enumerate(self.devices):
            self.after(i * spacing, lambda d=d: self._connect(d))  # type: ignore[misc]
            self.after(i * spacing + self.rng.uniform(0, self.cfg.report_every_s),
                       lambda d=d: self._telemetry(d))  # type: ignore[misc]
        self.mux.start()

    def stop(self) -> None:
        self.mux.stop()

    def _shutdown(self) -> None:
        """Say `offline` (retained, as an agent that stops does) and disconnect cleanly;
        the network thread then waits for the sockets to close."""
        self._stopping = True
        for d in self.devices:
            if d.connected:
                d.publish(d.topics.state, d.state_payload("offline"), retain=True)
                d.client.disconnect()
            elif d.client.socket() is not None:
                d.client.disconnect()


class Simulator:
    """N simulated devices in this process: `start()`, then `stop()` (or a `with` block)."""

    def __init__(self, cfg: SimConfig) -> None:
        if cfg.devices < 1:
            raise ValueError("--devices must be at least 1")
        if cfg.report_every_s <= 0:
            raise ValueError("--report-every must be positive")
        self.cfg = cfg
        self.address = parse_broker_url(cfg.broker_url)
        self.stats = SimStats()
        ids = cfg.device_ids()
        ctx = None
        if self.address.tls:
            ctx = (cfg.security or TransportSecurity()).ssl_context()
        threads = max(1, min(cfg.threads, len(ids)))
        self.groups = [DeviceGroup(i, cfg, self.address, ids[i::threads], self.stats, ctx)
                       for i in range(threads)]

    @property
    def device_ids(self) -> list[str]:
        return sorted(d.device_id for g in self.groups for d in g.devices)

    def start(self) -> Simulator:
        for g in self.groups:
            g.start()
        return self

    def wait_connected(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.stats.connected < self.cfg.devices:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        for g in self.groups:
            g.stop()
        for g in self.groups:
            if g.thread.is_alive():
                g.thread.join(15)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
