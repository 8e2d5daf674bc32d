"""One agent process as the deploy-safety tests drive it (tests/test_deploy_safety.py,
tests/test_deploy_atomic.py): `Device` with its topics, its events and the fleet CLI; the
models they deploy; manifests made and published by hand; the answer a version must give."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.models import build_nan, build_scaled
from edgeinfer.contract.manifest import Manifest, ModelSpec
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.client import InferenceClient, InferResult
from edgeinfer.fleet.deploy import publish_desired
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.signing import Signer
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import Watch, reported, wait_state

PREFIX = "edge/v1"
MODEL = "m"
X = (np.arange(64, dtype=np.float32).reshape(1, 64) - 32) / 8


@dataclass(frozen=True)
class Models:
    v1: Path  # y = x, with a little work per job
    v2: Path  # y = 2x, the same work
    small_v2: Path  # y = 2x, 129 bytes: for the slow download
    nan: Path
    slow: Path  # y = x after a long MatMul chain
    garbage: Path  # random bytes: a correct sha256, but no model


def build_models(d: Path) -> Models:
    """The set the tests deploy, built into the folder `d`."""
    garbage = d / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    return Models(
        v1=build_scaled(d, 1.0, "v1.onnx", busy_layers=2, busy_rows=64),
        v2=build_scaled(d, 2.0, "v2.onnx", busy_layers=2, busy_rows=64),
        small_v2=build_scaled(d, 2.0, "small-v2.onnx"),
        nan=build_nan(d),
        slow=build_scaled(d, 1.0, "slow.onnx", busy_layers=8, busy_rows=512),
        garbage=garbage,
    )


class Device:
    """One agent process, its topics, its events and the fleet CLI pointed at it."""

    def __init__(self, root: Path, broker: Broker, device: str, **overrides: Any) -> None:
        self.id = device
        self.url = broker.url
        self.root = root
        self.topics = Topics(PREFIX, device)
        self.agent = AgentProcess(root / "agent", broker.url, device, **overrides)
        self.events = Watch(broker.url, self.topics.events)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.agent.start(env)
        wait_state(self.url, "online", self.id, timeout=60)

    def deploy(self, *args: str) -> int:
        return fleet(["deploy", "--broker", self.url, "--device", self.id,
                      "--artifact-dir", str(self.root / "artifacts"), "--model", MODEL, *args])

    def reported(self) -> dict[str, Any]:
        return reported(self.url, self.id)

    def version_failed(self, version: str, needle: str, timeout: float = 20.0) -> dict[str, Any]:
        """`reported` once it says `version` failed (with `needle` in its error)."""
        deadline = time.monotonic() + timeout
        while True:
            rep = self.reported()
            status = {m["version"]: m for m in rep["models"]}
            if status.get(version, {}).get("state") == "failed":
                assert needle in status[version]["error"], status[version]
                return rep
            assert time.monotonic() < deadline, rep
            time.sleep(0.05)

    def mark(self) -> int:
        """Where the events seen so far end: `event(..., after=mark)` looks past them."""
        return len(self.events.snapshot())

    def event(self, kind: str, timeout: float = 30.0, after: int = 0,
              **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events.snapshot()[after:]:
                if e["type"] == kind and all(e.get(k) == v for k, v in fields.items()):
                    return e
            assert time.monotonic() < deadline, (
                f"no {kind} {fields} event: {self.events.snapshot()[after:]}")
            time.sleep(0.05)

    def wait_log(self, needle: str, after: int, timeout: float = 60.0) -> str:
        """The log written since offset `after`, once it holds `needle`."""
        deadline = time.monotonic() + timeout
        while needle not in (text := self.agent.log_text()[after:]):
            assert time.monotonic() < deadline, f"{needle!r} not logged:\n{text[-3000:]}"
            time.sleep(0.05)
        return text

    def close(self) -> None:
        self.agent.stop()
        self.events.close()


def answers(client: InferenceClient, device: str, version: str, factor: float) -> InferResult:
    """A job without a version: the serving version answers, with its own outputs."""
    result = client.infer(MODEL, {"x": X}, device=device, timeout=20)
    assert result.model_version == version, result.raw
    np.testing.assert_array_equal(result.outputs["y"], X * factor)
    return result


def spec(path: Path, version: str, **over: Any) -> ModelSpec:
    data = path.read_bytes()
    fields: dict[str, Any] = {"name": MODEL, "version": version, "uri": path.as_uri(),
                              "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    fields.update(over)
    return msgspec.convert(fields, ModelSpec)


def publish(dev: Device, manifest: Manifest, signer: Signer | None = None) -> None:
    with connect(dev.url) as conn:
        publish_desired(conn, dev.topics, manifest, signer=signer)


def publish_raw(dev: Device, payload: bytes) -> None:
    with connect(dev.url) as conn:
        conn.publish(dev.topics.desired, payload, qos=1, retain=True).result(5)

