"""The controller's composition root: the parts `edge-fleet serve` runs, wired together
over one registry and one artifact store, started in order and stopped in reverse.

- `Controller` (fleet/controller.py): the MQTT session that keeps every device's state,
  reported, telemetry and events in the registry;
- `ControllerServer` (fleet/http_api.py): GET/HEAD /artifacts/sha256/<hex> and the JSON API;
- `ChunkServer` (fleet/chunk_server.py): the same store in chunks over the broker, for
  mqtt:///artifacts/sha256/<hex>;
- `RolloutRunner` (fleet/rollout/): drives the rollouts recorded in the registry, so a
  restart resumes them.

The CLI (fleet/cli/serve.py) reads flags and the fleet config into `ServeSettings`, opens
the registry, calls `start_controller` and owns the wait and the registry's closing.

`RolloutDriver` is the smaller composition of `edge-fleet rollout --drive` (for when no
controller runs): an ingesting controller session and the engine, for one rollout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edgeinfer.contract.transport import TransportError, TransportSecurity
from edgeinfer.fleet.artifacts import ArtifactServer, ArtifactStore
from edgeinfer.fleet.chunk_server import ChunkServer
from edgeinfer.fleet.controller import Controller
from edgeinfer.fleet.http_api import Api, ControllerServer
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.registry import SqlRegistry
from edgeinfer.fleet.rollout import RolloutRunner
from edgeinfer.fleet.signing import Signer


class StartError(Exception):
    """A part cannot start: a broker option the transport refuses, an address in use.
    The message is one line for the operator."""


@dataclass(frozen=True)
class ServeSettings:
    """Where the controller connects and listens, resolved from flags and the config."""

    broker: str
    prefix: str
    host: str
    port: int
    security: TransportSecurity
    client_id: str  # the controller's persistent session; the chunk server adds -artifacts
    session_expiry_s: int
    keepalive_s: int
    signer: Signer | None  # signs the manifests rollouts publish


@dataclass
class RunningController:
    """The started parts; `stop()` stops them, the registry stays open (its owner closes it)."""

    controller: Controller
    server: ArtifactServer  # a ControllerServer: the artifact routes and the JSON API
    chunks: ChunkServer
    rollouts: RolloutRunner

    def stop(self) -> None:
        self.server.shutdown()
        self.chunks.stop()
        self.rollouts.stop()
        self.controller.stop()


def start_controller(registry: SqlRegistry, store: ArtifactStore,
                     settings: ServeSettings) -> RunningController:
    """Build and start every part; a `StartError` when the session or the HTTP server
    cannot be made (nothing runs then)."""
    s = settings
    try:
        controller = Controller(
            registry, s.broker, prefix=s.prefix, client_id=s.client_id, security=s.security,
            session_expiry_s=s.session_expiry_s, keepalive_s=s.keepalive_s,
        )
    except (ValueError, TransportError) as exc:
        raise StartError(str(exc)) from None
    try:
        store.dir.mkdir(parents=True, exist_ok=True)
        server = ControllerServer(store, Api(registry, controller.status), s.host, s.port).start()
    except OSError as exc:
        raise StartError(f"cannot serve on {s.host}:{s.port}: {exc}") from None
    controller.start()
    chunks: ChunkServer | None = None
    try:
        chunks = ChunkServer(store, s.broker, prefix=s.prefix, client_id=f"{s.client_id}-artifacts",
                             security=s.security).start()
        rollouts = RolloutRunner(registry, lambda: connect(s.broker, security=s.security),
                                 prefix=s.prefix, driver=s.client_id, signer=s.signer).start()
    except BaseException:
        # What already runs must not outlive the failure (its threads would hold the process).
        server.shutdown()
        if chunks is not None:
            chunks.stop()
        controller.stop()
        raise
    return RunningController(controller, server, chunks, rollouts)


class RolloutDriver:
    """Drive one rollout from this process: a `Controller` session that ingests the
    devices' reports (no persistent session: it ends with us) and a `RolloutRunner`
    limited to that rollout. `start()`, then `stop()` (also after a failed start)."""

    def __init__(self, registry: SqlRegistry, broker: str, *, prefix: str,
                 security: TransportSecurity, signer: Signer | None, rollout_id: int,
                 tick_s: float) -> None:
        driver = f"edge-fleet-rollout-{os.getpid()}"
        try:
            self.controller = Controller(registry, broker, prefix=prefix, client_id=driver,
                                         security=security, session_expiry_s=0)
        except (ValueError, TransportError) as exc:
            raise StartError(str(exc)) from None
        self.runner = RolloutRunner(registry, lambda: connect(broker, security=security),
                                    prefix=prefix, driver=driver, signer=signer, tick_s=tick_s)
        self.runner.only = rollout_id

    def start(self) -> None:
        """Connect, take in the retained state and reported of every device, then drive;
        a `StartError` when the broker cannot be reached."""
        self.controller.start()
        if not self.controller.connected.wait(10):
            raise StartError(f"cannot reach broker {self.controller.url}")
        self.controller.wait_idle(5)  # the retained state/reported of every device first
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()
        self.controller.stop()
