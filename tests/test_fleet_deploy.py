"""`edge-fleet deploy`: the retained manifest it publishes, and `--wait` against a fake agent."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeinfer.contract.manifest import Manifest, ModelSpec, decode_manifest, encode_manifest
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.cli import main
from edgeinfer.fleet.deploy import DeployError, next_manifest, older_than_served, version_order
from edgeinfer.fleet.mqtt import connect, read_retained
from tests.broker import Broker

DEV = "gw-1"
TOPICS = Topics("edge/v1", DEV)


class FakeAgent:
    """Reconciles like an agent: `loading`, then `serving` (or `failed` for "broken")."""

    def __init__(self, url: str, device: str = DEV) -> None:
        self.topics = Topics("edge/v1", device)
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=device,
            protocol=paho.MQTTv5,
        )
        self.client.on_message = self._on_desired
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.client.loop_start()
        self.client.publish(self.topics.state, json.dumps({"state": "online"}), 1, retain=True)
        self.client.subscribe(self.topics.desired, 1)
        assert subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _report(self, revision: int | None, models: list[dict[str, Any]]) -> None:
        doc: dict[str, Any] = {"device_id": self.topics.device_id, "agent_version": "0.1.0",
               "revision": revision, "models": models, "last_error": None,
               "hardware": {}, "updated_at": "2026-01-01T00:00:00Z"}
        self.client.publish(self.topics.reported, json.dumps(doc), 1, retain=True)

    def _on_desired(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        manifest = decode_manifest(bytes(msg.payload))

        def entry(m: ModelSpec, state: str) -> dict[str, Any]:
            failed = state == "failed"
            return {"name": m.name, "version": m.version, "sha256": m.sha256, "state": state,
                    "runtime": None if failed else "onnxruntime",
                    "device": None if failed else "cpu",
                    "error": "cannot load: not an ONNX model" if failed else None,
                    "attempts": [{"runtime": "onnxruntime", "device": "cpu", "ok": not failed,
                                  "reason": "bad protobuf" if failed else None}]}

        self._report(None, [entry(m, "loading") for m in manifest.models])
        self._report(manifest.revision, [
            entry(m, "failed" if m.name == "broken" else "serving") for m in manifest.models
        ])


@pytest.fixture
def art_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "artifacts"
    monkeypatch.setenv("EDGE_FLEET_ARTIFACT_DIR", str(d))
    return d


def _file(tmp_path: Path, name: str, content: bytes) -> Path:
    f = tmp_path / name
    f.write_bytes(content)
    return f


def _desired(broker: Broker) -> Manifest:
    payload = read_retained(broker.url, TOPICS.desired)[TOPICS.desired]
    return decode_manifest(payload)


def _deploy(broker: Broker, *args: str) -> int:
    return main(["deploy", "--broker", broker.url, "--device", DEV, *args])


def test_deploy_publishes_a_manifest(broker: Broker, tmp_path: Path, art_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = _file(tmp_path, "digits.onnx", b"model-v1")
    rc = _deploy(broker, "--model", "digits", "--version", "1", "--file", str(f),
                 "--prefer", "cuda, openvino,onnxruntime", "--max-batch", "8",
                 "--max-delay-ms", "2")
    assert rc == 0
    out = capsys.readouterr().out
    assert "published revision 1 to edge/v1/dev/gw-1/desired: digits:1" in out
    manifest = _desired(broker)
    assert manifest.revision == 1
    assert manifest.issued_at is not None
    assert manifest.signature is None
    (m,) = manifest.models
    sha = hashlib.sha256(b"model-v1").hexdigest()
    assert (m.name, m.version, m.task, m.format) == ("digits", "1", "tensor", "onnx")
    assert (m.sha256, m.size) == (sha, 8)
    stored = art_dir.resolve() / "sha256" / sha
    assert m.uri == stored.as_uri()
    assert stored.read_bytes() == b"model-v1"
    assert m.runtime.prefer == ["cuda", "openvino", "onnxruntime"]
    assert (m.batching.max_batch, m.batching.max_delay_ms) == (8, 2.0)


def test_revisions_keep_other_models_and_remove(broker: Broker, tmp_path: Path,
                                                art_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a1 = _file(tmp_path, "a1.onnx", b"a-one")
    b1 = _file(tmp_path, "b1.onnx", b"b-one")
    a2 = _file(tmp_path, "a2.onnx", b"a-two")
    assert _deploy(broker, "--model", "a", "--version", "1", "--file", str(a1)) == 0
    assert _deploy(broker, "--model", "b", "--version", "1", "--file", str(b1),
                   "--artifact-base-url", "http://fleet:8780/") == 0
    assert _deploy(broker, "--model", "a", "--version", "2", "--file", str(a2)) == 0
    manifest = _desired(broker)
    assert manifest.revision == 3
    models = {m.name: m for m in manifest.models}
    assert {n: m.version for n, m in models.items()} == {"a": "2", "b": "1"}
    assert models["a"].sha256 == hashlib.sha256(b"a-two").hexdigest()
    assert models["b"].uri == f"http://fleet:8780/artifacts/sha256/{models['b'].sha256}"

    assert _deploy(broker, "--remove", "a") == 0
    manifest = _desired(broker)
    assert manifest.revision == 4
    assert [m.name for m in manifest.models] == ["b"]
    capsys.readouterr()

    assert _deploy(broker, "--remove", "a") == 1
    err = capsys.readouterr().err
    assert "has no model 'a' (models: b)" in err
    assert _desired(broker).revision == 4  # nothing published


def test_deploy_wait_serving(broker: Broker, tmp_path: Path, art_dir: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    agent = FakeAgent(broker.url)
    try:
        f = _file(tmp_path, "d.onnx", b"digits")
        rc = _deploy(broker, "--model", "digits", "--version", "3", "--file", str(f),
                     "--wait", "3")
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "digits:3 is serving on gw-1 via onnxruntime/cpu" in out

        assert _deploy(broker, "--remove", "digits", "--wait", "3") == 0
        assert "digits is no longer served on gw-1" in capsys.readouterr().out
    finally:
        agent.close()


def test_deploy_wait_failed(broker: Broker, tmp_path: Path, art_dir: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    agent = FakeAgent(broker.url)
    try:
        f = _file(tmp_path, "b.onnx", b"garbage")
        rc = _deploy(broker, "--model", "broken", "--version", "1", "--file", str(f),
                     "--wait", "3")
    finally:
        agent.close()
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken:1 failed on gw-1: cannot load: not an ONNX model" in err
    assert "tried onnxruntime/cpu: failed: bad protobuf" in err


def test_deploy_wait_times_out(broker: Broker, tmp_path: Path, art_dir: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with connect(broker.url) as conn:
        conn.publish(TOPICS.state, b'{"state": "offline"}', retain=True).result(2)
    f = _file(tmp_path, "d.onnx", b"digits")
    rc = _deploy(broker, "--model", "digits", "--version", "1", "--file", str(f),
                 "--wait", "0.5")
    assert rc == 1
    err = capsys.readouterr().err
    assert "timed out after 0.5s waiting for gw-1 to serve digits:1" in err
    assert "device state: offline" in err


def test_stale_failure_is_not_taken_for_the_new_deploy(
    broker: Broker, tmp_path: Path, art_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _file(tmp_path, "d.onnx", b"digits")
    sha = hashlib.sha256(b"digits").hexdigest()
    old = {"revision": 1, "models": [{"name": "digits", "version": "1", "sha256": sha,
                                      "state": "failed", "error": "old news"}]}
    with connect(broker.url) as conn:
        conn.publish(TOPICS.reported, json.dumps(old).encode(), retain=True).result(2)
    rc = _deploy(broker, "--model", "digits", "--version", "1", "--file", str(f),
                 "--wait", "0.4")
    assert rc == 1
    err = capsys.readouterr().err
    assert "timed out" in err
    assert "old news" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "m", "--version", "1"], "deploy needs --file"),
    (["--model", "m", "--version", "1", "--file", "/no/such.onnx"], "no such file"),
    (["--remove", "m", "--model", "m"], "cannot be combined with --model"),
    (["--model", "a b", "--version", "1", "--file", "FILE"], "model name 'a b' must match"),
    (["--model", "m", "--version", "1", "--file", "FILE", "--max-batch", "0"],
     "max_batch"),
    (["--model", "m", "--version", "1", "--file", "FILE", "--artifact-base-url", "fleet:1"],
     "must look like http://host:port"),
])
def test_usage_errors_exit_2(broker: Broker, tmp_path: Path, art_dir: Path,
                             capsys: pytest.CaptureFixture[str], args: list[str],
                             message: str) -> None:
    f = _file(tmp_path, "m.onnx", b"m")
    args = [str(f) if a == "FILE" else a for a in args]
    assert _deploy(broker, *args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_unusable_current_manifest(broker: Broker, tmp_path: Path, art_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with connect(broker.url) as conn:
        conn.publish(TOPICS.desired, b'{"revision": "x"}', retain=True).result(2)
    f = _file(tmp_path, "m.onnx", b"m")
    assert _deploy(broker, "--model", "m", "--version", "1", "--file", str(f)) == 1
    assert "fix or clear it" in capsys.readouterr().err


def test_unreachable_broker_exit_2(tmp_path: Path, art_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.broker import free_port

    f = _file(tmp_path, "m.onnx", b"m")
    url = f"mqtt://127.0.0.1:{free_port()}"
    rc = main(["deploy", "--broker", url, "--device", DEV, "--model", "m", "--version", "1",
               "--file", str(f)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edge-fleet deploy: cannot reach broker {url}: ")
    assert err.count("\n") == 1


def test_revision_passes_the_applied_one(broker: Broker, tmp_path: Path,
                                         art_dir: Path) -> None:
    # `desired` was cleared, but the agent applied revision 5: it would refuse 1.
    with connect(broker.url) as conn:
        conn.publish(TOPICS.reported, b'{"revision": 5, "models": []}', retain=True).result(2)
    f = _file(tmp_path, "m.onnx", b"m")
    assert _deploy(broker, "--model", "m", "--version", "1", "--file", str(f)) == 0
    assert _desired(broker).revision == 6


def test_next_manifest_drops_the_old_signature() -> None:
    spec = ModelSpec(name="m", version="1", uri="file:///x", sha256="a" * 64, size=1)
    signed = decode_manifest(
        encode_manifest(Manifest(revision=7, models=[spec]))[:-1]
        + b',"signature":{"alg":"ed25519","key_id":"k","value":"v"}}'
    )
    assert signed.signature is not None
    nxt = next_manifest(signed, upsert=spec)
    assert (nxt.revision, nxt.signature, nxt.models) == (8, None, [spec])
    with pytest.raises(DeployError, match="no model 'zz'"):
        next_manifest(None, remove="zz")


def test_a_version_older_than_the_served_one_is_told_apart() -> None:
    """`deploy` refuses such a version without --rollback; versions it cannot order (not
    of the form 3, 1.10.2, v2) are not compared."""
    def entry(version: str) -> ModelSpec:
        return ModelSpec(name="m", version=version, uri="file:///x", sha256="a" * 64, size=1)

    assert version_order("v1.10.2") == (1, 10, 2) and version_order("beta") is None
    serving = {"models": [{"name": "m", "version": "1.10", "state": "serving"}]}
    assert older_than_served(entry("1.9"), None, serving) == "1.10"
    assert older_than_served(entry("1.11"), None, serving) is None
    assert older_than_served(entry("beta"), None, serving) is None
    # Nothing serves yet: the desired manifest's version counts.
    desired = Manifest(revision=3, models=[entry("4")])
    failed = {"models": [{"name": "m", "version": "4", "state": "failed"}]}
    assert older_than_served(entry("3"), desired, failed) == "4"
    # The rollback manifest says so; a plain one does not write the field at all.
    assert next_manifest(desired, upsert=entry("3"), rollback=True).rollback is True
    assert b"rollback" not in encode_manifest(next_manifest(desired, upsert=entry("5")))
