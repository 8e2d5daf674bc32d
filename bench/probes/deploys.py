"""Figures for deploys that must not hang or go backwards (issue 12, points 4, 7, 8).

Not a test: it prints what happened, through a real mosquitto, real `edge-agent`
processes and a real HTTP server that trickles its header.

    python -m bench.probes.deploys

(a) a header trickled one byte a second with deploy.download_timeout_s=5: seconds until the
    download ended, and seconds a newer manifest published 2 s into it waited to be applied;
(b) with trust keys: the applied revision again with other content (fresh, then expired);
    without keys: a lower revision. Accepted or refused each;
(c) a manifest `files` entry named `..`: the error the agent gives.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench.models import build_scaled
from edgeinfer.contract.manifest import ArtifactFile, Manifest, ModelSpec
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.deploy import publish_desired
from edgeinfer.fleet.localbroker import Broker
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.signing import Signer, generate_key, load_signer
from tests.agentproc import AgentProcess
from tests.helpers import Watch, reported, wait_state
from tests.slowhttp import SlowServer

PREFIX = "edge/v1"
# The trickling server gives up after this long: a bound on the probe, not on the agent.
SERVER_GIVES_UP_S = 30.0


def spec(path: Path, version: str, **over: Any) -> ModelSpec:
    data = path.read_bytes()
    fields: dict[str, Any] = {"name": "m", "version": version, "uri": path.as_uri(),
                              "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    fields.update(over)
    return msgspec.convert(fields, ModelSpec)


class Agent:
    def __init__(self, root: Path, broker: Broker, device: str, **overrides: Any) -> None:
        self.url = broker.url
        self.id = device
        self.topics = Topics(PREFIX, device)
        self.proc = AgentProcess(root / device, broker.url, device, **overrides)
        self.events = Watch(broker.url, self.topics.events)
        self.proc.start()
        wait_state(self.url, "online", device, timeout=60)

    def publish(self, manifest: Manifest, signer: Signer | None = None) -> float:
        with connect(self.url) as conn:
            publish_desired(conn, self.topics, manifest, signer=signer)
        return time.monotonic()

    def first(self, pred: Callable[[dict[str, Any]], bool], after: int,
              timeout: float) -> tuple[dict[str, Any] | None, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events.snapshot()[after:]:
                if pred(e):
                    return e, time.monotonic()
            time.sleep(0.02)
        return None, time.monotonic()

    def mark(self) -> int:
        return len(self.events.snapshot())

    def revision(self) -> int:
        return int(reported(self.url, self.id)["revision"])

    def close(self) -> None:
        self.proc.stop()
        self.events.close()


def verdict(agent: Agent, revision: int, after: int, timeout: float = 10.0) -> str:
    """accepted / refused (reason) / nothing, by the first event about `revision`."""
    event, _ = agent.first(
        lambda e: e.get("revision") == revision
        and e["type"] in ("manifest_rejected", "deploy_started"), after, timeout)
    if event is None:
        return "no event (unchanged: a no-op)"
    if event["type"] == "manifest_rejected":
        return f"refused ({event['reason']}): {event['message']}"
    return "accepted (deploy_started)"


def trickled(agent: Agent, v1: Path, v2: Path) -> None:
    with SlowServer(b"", chunk=1, interval=1.0, header_interval=1.0,
                    give_up_s=SERVER_GIVES_UP_S) as slow:
        rev = agent.revision()
        # (a1) alone: when does the download end?
        mark = agent.mark()
        t0 = agent.publish(Manifest(revision=rev + 1, models=[
            spec(v2, "slow", uri=slow.url, sha256="0" * 64, size=100)]))
        event, t1 = agent.first(lambda e: e["type"] in ("model_failed", "deploy_superseded")
                                and e.get("version") == "slow", mark, SERVER_GIVES_UP_S + 30)
        print(f"(a1) trickled header, download_timeout_s=5: download ended after "
              f"{t1 - t0:.1f}s: {event['message'] if event else 'not within the probe'}")
        event, _ = agent.first(lambda e: e["type"] in ("deploy_finished", "deploy_failed")
                               and e.get("revision") == rev + 1, mark, 5)
        # (a2) a newer manifest 2 s into a trickled download: how long does it wait?
        mark = agent.mark()
        agent.publish(Manifest(revision=rev + 2, models=[
            spec(v2, "slow2", uri=slow.url, sha256="1" * 64, size=100)]))
        time.sleep(2.0)
        t0 = agent.publish(Manifest(revision=rev + 3, models=[spec(v2, "2")]))
        event, t1 = agent.first(lambda e: e["type"] == "deploy_finished"
                                and e.get("revision") == rev + 3, mark, SERVER_GIVES_UP_S + 30)
        print(f"(a2) newer manifest published 2s into a trickled download: applied after "
              f"{t1 - t0:.1f}s" + ("" if event else " (not within the probe)"))
        kinds = [e["type"] for e in agent.events.snapshot()[mark:]
                 if e["type"] not in ("model_serving", "artifact_verified", "model_unloaded")]
        print(f"     events: {', '.join(kinds)}")
        # Let the refused trickle connection go before the server closes.


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="probe-deploys-") as tmp:
        root = Path(tmp)
        v1 = build_scaled(root, 1.0, "v1.onnx")
        v2 = build_scaled(root, 2.0, "v2.onnx")
        broker = Broker(root / "broker")
        broker.start()
        try:
            plain = Agent(root, broker, "probe-plain", deploy={"download_timeout_s": 5.0})
            try:
                plain.publish(Manifest(revision=10, models=[spec(v1, "1")]))
                plain.first(lambda e: e["type"] == "deploy_finished", 0, 60)
                trickled(plain, v1, v2)
                rev = plain.revision()
                # (b3) without keys, a lower revision.
                mark = plain.mark()
                plain.publish(Manifest(revision=rev - 5, models=[spec(v1, "1")]))
                print(f"(b3) no keys, revision {rev - 5} below the applied {rev}: "
                      f"{verdict(plain, rev - 5, mark)}")
                # (c) a files entry named "..".
                rev = max(rev, plain.revision())
                mark = plain.mark()
                bad = spec(v2, "dots", files=[ArtifactFile(name="..", uri=v1.as_uri(),
                                                           sha256=spec(v1, "x").sha256,
                                                           size=v1.stat().st_size)])
                plain.publish(Manifest(revision=rev + 1, models=[bad]))
                event, _ = plain.first(
                    lambda e: e["type"] in ("manifest_rejected", "model_failed"), mark, 20)
                print(f"(c) files entry named '..': "
                      f"{event['type'] + ': ' + event['message'] if event else 'no error'}")
            finally:
                plain.close()
            key = generate_key("probe-1", root / "keys")
            signer = load_signer(key.private)
            signed = Agent(root, broker, "probe-signed", trust={"keys": {"probe-1": key.public_b64}})
            try:
                signed.publish(Manifest(revision=5, models=[spec(v1, "1")]), signer)
                signed.first(lambda e: e["type"] == "deploy_finished", 0, 60)
                mark = signed.mark()
                signed.publish(Manifest(revision=5, models=[spec(v1, "1"), spec(v2, "2x",
                                        name="other")]), signer)
                said = verdict(signed, 5, mark)
                print(f"(b1) keys, applied revision 5 again with other content: {said}")
                if said.startswith("accepted"):
                    signed.first(lambda e: e["type"] in ("deploy_finished", "deploy_failed"),
                                 mark, 30)
                mark = signed.mark()
                signed.publish(Manifest(revision=5, models=[spec(v2, "3")],
                                        expires_at="2020-01-01T00:00:00Z"), signer)
                said = verdict(signed, 5, mark)
                print(f"(b2) keys, applied revision 5 again, other content, expired 2020: {said}")
                if said.startswith("accepted"):
                    signed.first(lambda e: e["type"] in ("deploy_finished", "deploy_failed"),
                                 mark, 30)
                mark = signed.mark()
                signed.publish(Manifest(revision=6, models=[spec(v1, "1")],
                                        expires_at="2020-01-01T00:00:00Z"), signer)
                print(f"(b2') keys, revision 6, expired 2020: {verdict(signed, 6, mark)}")
            finally:
                signed.close()
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
