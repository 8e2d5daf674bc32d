"""The rollout engine at work: on its own thread with its own MQTT connection (inside
`edge-fleet serve`, or `rollout start --drive`), writing desired manifests as retained
messages, signed when a signer is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgeinfer.contract.manifest import Manifest
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.deploy import publish_desired, read_current
from edgeinfer.fleet.mqtt import BrokerError, Connection
from edgeinfer.fleet.registry import SqlRegistry
from edgeinfer.fleet.rollout.engine import DEFAULT_LEASE_S, RolloutEngine
from edgeinfer.fleet.rollout.store import RolloutStore
from edgeinfer.fleet.signing import Signer

# The package's name, as before the package was split: log filters keep matching.
log = logging.getLogger(__package__)


class MqttDesired:
    """Retained `desired` over one MQTT connection, signed when a signer is given."""

    def __init__(self, conn: Connection, prefix: str, signer: Signer | None = None) -> None:
        self.conn = conn
        self.prefix = prefix
        self.signer = signer

    def read(self, device_id: str) -> tuple[Manifest | None, int | None]:
        return read_current(self.conn, Topics(self.prefix, device_id))

    def publish(self, device_id: str, manifest: Manifest) -> None:
        publish_desired(self.conn, Topics(self.prefix, device_id), manifest, signer=self.signer)


class RolloutRunner:
    """The engine on a thread with its own MQTT connection (inside `edge-fleet serve`, or
    `rollout start --drive`). Survives broker and database outages: it retries."""

    def __init__(self, registry: SqlRegistry, connect: Callable[[], Connection], *, prefix: str,
                 driver: str, signer: Signer | None = None, tick_s: float = 1.0,
                 lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = RolloutStore(registry)
        self._connect = connect
        self.prefix = prefix
        self.driver = driver
        self.signer = signer
        self.tick_s = tick_s
        self.lease_s = lease_s
        self.only: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None

    def start(self) -> RolloutRunner:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rollouts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        engine: RolloutEngine | None = None
        try:
            while not self._stop.is_set():
                try:
                    if engine is None:
                        self._conn = self._connect()
                        engine = RolloutEngine(
                            self.store, MqttDesired(self._conn, self.prefix, self.signer),
                            driver=self.driver, lease_s=self.lease_s)
                    engine.step(self.only)
                except BrokerError as exc:
                    log.warning("rollouts: %s (retrying)", exc)
                    if self._conn is not None:
                        self._conn.close()
                    self._conn, engine = None, None
                except Exception:
                    log.exception("rollout step failed (retrying)")
                self._stop.wait(self.tick_s)
        finally:
            if engine is not None:
                engine.release_all()
            if self._conn is not None:
                self._conn.close()

