"""Deploys a device refuses: unsigned, altered or foreign manifests, rollbacks and reused or
expired revisions; artifacts that do not match or do not arrive in time; models that fail the
health gate. A real mosquitto, real agent processes, real models (tests/deploydevice.py).

In every refusal the old version keeps serving and answering jobs; `reported` and `events`
say why.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest

from edgeinfer.contract.manifest import Manifest
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.signing import generate_key, load_signer
from tests.broker import Broker
from tests.deploydevice import Device, Models, X, answers, publish, publish_raw, spec
from tests.slowhttp import SlowServer

# --- signed deploys ------------------------------------------------------------------------


def test_signed_deploys_refuse_what_they_must_and_keep_serving(
    module_broker: Broker, module_client: InferenceClient, deploy_models: Models, tmp_path: Path,
) -> None:
    k1 = generate_key("fleet-1", tmp_path / "keys")
    k2 = generate_key("fleet-2", tmp_path / "keys")
    rogue = generate_key("fleet-9", tmp_path / "rogue")
    dev = Device(tmp_path, module_broker, "gw-signed",
                 trust={"keys": {"fleet-1": k1.public_b64},
                        "key_files": {"fleet-2": str(k2.public)}})
    dev.start()
    try:
        assert dev.deploy("--version", "1", "--file", str(deploy_models.v1), "--wait", "60",
                          "--sign-key", str(k1.private)) == 0
        answers(module_client, dev.id, "1", 1.0)
        applied = dev.reported()["revision"]
        signer1, signer2 = load_signer(k1.private), load_signer(k2.private)

        def refused(reason: str, revision: int) -> None:
            event = dev.event("manifest_rejected", after=mark, reason=reason, revision=revision)
            assert event["message"]
            deadline = time.monotonic() + 10
            while f"manifest revision {revision} refused ({reason})" not in str(
                    dev.reported()["last_error"]):
                assert time.monotonic() < deadline, dev.reported()["last_error"]
                time.sleep(0.1)
            answers(module_client, dev.id, "1" if reason != "rollback" else "2",
                    1.0 if reason != "rollback" else 2.0)

        # Unsigned: `deploy --wait` sees the refusal at once and says so.
        mark = dev.mark()
        started = time.monotonic()
        assert dev.deploy("--version", "2", "--file", str(deploy_models.v2), "--wait", "30") == 1
        assert time.monotonic() - started < 20
        refused("unsigned", applied + 1)
        # Altered after signing: the artifact swapped under a valid signature.
        good = Manifest(revision=applied + 2, models=[spec(deploy_models.v2, "2")])
        payload = signer1.sign(good)
        evil = spec(deploy_models.nan, "2")
        tampered = payload.replace(spec(deploy_models.v2, "2").sha256.encode(), evil.sha256.encode())
        assert tampered != payload
        mark = dev.mark()
        publish_raw(dev, tampered)
        refused("bad_signature", applied + 2)
        # A key the agent does not trust.
        mark = dev.mark()
        publish(dev, Manifest(revision=applied + 3, models=[spec(deploy_models.v2, "2")]),
                load_signer(rogue.private))
        refused("unknown_key", applied + 3)
        # Rotation: the second trusted key works while the first still does.
        assert dev.deploy("--version", "2", "--file", str(deploy_models.v2), "--wait", "60",
                          "--sign-key", str(k2.private)) == 0
        answers(module_client, dev.id, "2", 2.0)
        now_applied = dev.reported()["revision"]
        assert now_applied > applied
        with connect(dev.url) as conn:
            applied_payload = conn.read_retained([dev.topics.desired])[dev.topics.desired]
        # Rollback: a validly signed, older revision.
        mark = dev.mark()
        publish(dev, Manifest(revision=applied, models=[spec(deploy_models.v1, "1")]), signer1)
        refused("rollback", applied)
        # The applied revision again with other content: refused, fresh or expired; with
        # the same content it is the re-delivery every reconnect makes: nothing happens.
        for expires in (None, "2020-01-01T00:00:00Z"):
            mark = dev.mark()
            publish(dev, Manifest(revision=now_applied, models=[spec(deploy_models.v1, "1")],
                                  expires_at=expires), signer1)
            dev.event("manifest_rejected", after=mark, reason="reused_revision",
                      revision=now_applied)
            answers(module_client, dev.id, "2", 2.0)
        mark = dev.mark()
        publish_raw(dev, applied_payload)
        time.sleep(1.0)
        assert [e for e in dev.events.snapshot()[mark:] if e.get("revision") == now_applied] == []
        # Expired.
        mark = dev.mark()
        publish(dev, Manifest(revision=now_applied + 1, models=[spec(deploy_models.v1, "1")],
                              expires_at="2020-01-01T00:00:00Z"), signer2)
        dev.event("manifest_rejected", after=mark, reason="expired", revision=now_applied + 1)
        answers(module_client, dev.id, "2", 2.0)

        # The applied revision survives a restart: the rollback is still refused after it.
        dev.agent.stop()
        offset, mark = len(dev.agent.log_text()), dev.mark()
        dev.start()
        dev.wait_log("restored 1 model(s)", offset)
        # The retained (expired) manifest comes again, and is refused again.
        dev.event("manifest_rejected", after=mark, reason="expired", revision=now_applied + 1)
        answers(module_client, dev.id, "2", 2.0)
        assert dev.reported()["revision"] == now_applied
        mark = dev.mark()
        publish(dev, Manifest(revision=applied, models=[spec(deploy_models.v1, "1")]), signer1)
        dev.event("manifest_rejected", after=mark, reason="rollback", revision=applied)
        answers(module_client, dev.id, "2", 2.0)
    finally:
        dev.close()


# --- artifacts that do not match, or do not arrive in time ---------------------------------


def test_bad_artifacts_are_refused_and_the_old_version_serves(
    module_broker: Broker, module_client: InferenceClient, deploy_models: Models, tmp_path: Path,
) -> None:
    dev = Device(tmp_path, module_broker, "gw-artifacts", deploy={"download_timeout_s": 1.0})
    dev.start()
    try:
        assert dev.deploy("--version", "1", "--file", str(deploy_models.v1), "--wait", "60") == 0
        rev = dev.reported()["revision"]
        right = spec(deploy_models.v2, "2")
        with SlowServer(deploy_models.small_v2.read_bytes(), chunk=8, interval=0.1) as slow:
            cases: list[tuple[str, dict[str, Any], str]] = [
                ("2a", {"sha256": "0" * 64}, "has sha256"),
                ("2b", {"size": right.size - 100}, "longer than"),
                ("2c", {"size": right.size + 100}, f"has {right.size} bytes"),
                ("2d", {"uri": slow.url, "sha256": spec(deploy_models.small_v2, "x").sha256,
                        "size": deploy_models.small_v2.stat().st_size},
                 "did not finish within deploy.download_timeout_s=1s"),
            ]
            for version, over, needle in cases:
                rev += 1
                started = time.monotonic()
                mark = dev.mark()
                publish(dev, Manifest(revision=rev, models=[spec(deploy_models.v2, version, **over)]))
                failed = dev.event("model_failed", after=mark, version=version)
                assert failed["stage"] == "artifact" and needle in failed["message"]
                assert time.monotonic() - started < 15
                dev.event("kept_serving", after=mark, version="1")
                rep = dev.version_failed(version, needle)
                assert {m["version"]: m for m in rep["models"]}["1"]["state"] == "serving"
                assert needle in rep["last_error"]
                answers(module_client, dev.id, "1", 1.0)
        state = dev.agent.state_dir
        assert list((state / "tmp").iterdir()) == []
        assert [p.name for p in (state / "models" / "sha256").iterdir()] == [
            spec(deploy_models.v1, "1").sha256]
    finally:
        dev.close()


def test_a_trickled_header_is_cut_at_the_deadline_and_never_holds_a_newer_manifest(
    module_broker: Broker, module_client: InferenceClient, deploy_models: Models, tmp_path: Path,
) -> None:
    """One header byte a second: a per-read timeout never fires, the deadline does. And a
    newer manifest published during such a download is applied at once, not after it."""
    dev = Device(tmp_path, module_broker, "gw-trickle", deploy={"download_timeout_s": 3.0})
    dev.start()
    try:
        assert dev.deploy("--version", "1", "--file", str(deploy_models.v1), "--wait", "60") == 0
        rev = dev.reported()["revision"]
        stuck = {"sha256": spec(deploy_models.small_v2, "x").sha256,
                 "size": deploy_models.small_v2.stat().st_size}
        with SlowServer(b"", chunk=1, interval=1.0, header_interval=1.0, give_up_s=60) as slow:
            mark = dev.mark()
            started = time.monotonic()
            publish(dev, Manifest(revision=rev + 1,
                                  models=[spec(deploy_models.v2, "slow", uri=slow.url, **stuck)]))
            dev.event("deploy_started", after=mark, revision=rev + 1)
            answers(module_client, dev.id, "1", 1.0)  # the old version serves meanwhile
            failed = dev.event("model_failed", after=mark, version="slow", timeout=15)
            took = time.monotonic() - started
            assert failed["cause"] == "deadline", failed
            assert "deploy.download_timeout_s=3s" in failed["message"]
            assert 2.5 < took < 8, took
            answers(module_client, dev.id, "1", 1.0)

            # A newer manifest supersedes a download in progress and is applied at once.
            mark = dev.mark()
            publish(dev, Manifest(revision=rev + 2,
                                  models=[spec(deploy_models.v2, "slow2", uri=slow.url, **stuck)]))
            dev.event("deploy_started", after=mark, revision=rev + 2)
            time.sleep(1.0)
            started = time.monotonic()
            publish(dev, Manifest(revision=rev + 3, models=[spec(deploy_models.v2, "2")]))
            superseded = dev.event("deploy_superseded", after=mark, revision=rev + 2, timeout=5)
            assert superseded["by"] == rev + 3 and superseded["version"] == "slow2"
            dev.event("deploy_finished", after=mark, revision=rev + 3, timeout=20)
            assert time.monotonic() - started < 2.5  # far below the 3 s deadline
            assert not [e for e in dev.events.snapshot()[mark:] if e["type"] == "model_failed"]
            answers(module_client, dev.id, "2", 2.0)
            assert dev.reported()["revision"] == rev + 3
    finally:
        dev.close()


def test_revisions_only_move_forward_without_keys_and_a_rollback_says_so(
    module_broker: Broker, module_client: InferenceClient, deploy_models: Models, tmp_path: Path,
) -> None:
    dev = Device(tmp_path, module_broker, "gw-forward")
    dev.start()
    try:
        assert dev.deploy("--version", "1", "--file", str(deploy_models.v1), "--wait", "60") == 0
        assert dev.deploy("--version", "2", "--file", str(deploy_models.v2), "--wait", "60") == 0
        rev = dev.reported()["revision"]
        # A lower revision (an old retained manifest, a stale publisher) is refused.
        mark = dev.mark()
        publish(dev, Manifest(revision=rev - 1, models=[spec(deploy_models.v1, "1")]))
        dev.event("manifest_rejected", after=mark, reason="rollback", revision=rev - 1)
        answers(module_client, dev.id, "2", 2.0)
        # edge-fleet deploy will not go back to an older version by accident ...
        assert dev.deploy("--version", "1", "--file", str(deploy_models.v1), "--wait", "30") == 1
        assert dev.reported()["revision"] == rev
        # ... but does on purpose, under the next revision, and the agent says it.
        mark = dev.mark()
        assert dev.deploy("--version", "1", "--file", str(deploy_models.v1), "--wait", "60",
                          "--rollback") == 0
        started = dev.event("deploy_started", after=mark, revision=rev + 1)
        finished = dev.event("deploy_finished", after=mark, revision=rev + 1)
        assert started["rollback"] is True and finished["rollback"] is True
        answers(module_client, dev.id, "1", 1.0)
        assert dev.reported()["rollback"] is True

        # A files entry that names no file is refused naming its key; v1 keeps serving.
        for name in ("..", "."):
            side = {"name": name, "uri": deploy_models.v1.as_uri(),
                    "sha256": spec(deploy_models.v1, "x").sha256, "size": deploy_models.v1.stat().st_size}
            payload = json.dumps({"revision": rev + 5, "models": [
                msgspec.to_builtins(spec(deploy_models.v2, "3")) | {"files": [side]}]}).encode()
            mark = dev.mark()
            publish_raw(dev, payload)
            event = dev.event("manifest_rejected", after=mark, reason="invalid",
                              revision=rev + 5)
            assert "models[0].files[0].name" in event["message"], event
            answers(module_client, dev.id, "1", 1.0)
    finally:
        dev.close()


# --- the health gate -----------------------------------------------------------------------


def median_ms(path: Path) -> float:
    """The fastest of the agent's CPU runtimes on `path`: median of 5 runs after a warm-up."""
    ort_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ov_model = ov.Core().compile_model(str(path), "CPU")

    def on_ort() -> None:
        ort_session.run(None, {"x": X})

    def on_openvino() -> None:
        ov_model({"x": X})

    medians = []
    for run in (on_ort, on_openvino):
        run()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) * 1000)
        medians.append(statistics.median(times))
    return min(medians)


def tensor(name: str, arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": list(arr.shape),
            "data": arr.ravel().tolist()}


def test_health_gate_keeps_bad_versions_out(
    module_broker: Broker, module_client: InferenceClient, deploy_models: Models, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    budget = median_ms(deploy_models.slow) / 10  # 10x slower than the budget on either runtime
    health_files = {}
    for name, doc in {
        "budget": {"max_latency_ms": budget},
        "wrong": {"inputs": [tensor("x", X)], "expected": [tensor("y", X * 3)]},
        "right": {"inputs": [tensor("x", X)], "expected": [tensor("y", X * 2)], "atol": 0,
                  "rtol": 0, "max_latency_ms": 10_000},
    }.items():
        health_files[name] = tmp_path / f"{name}.json"
        health_files[name].write_text(json.dumps(doc))
    dev = Device(tmp_path, module_broker, "gw-health")
    dev.start()
    try:
        assert dev.deploy("--version", "1", "--file", str(deploy_models.v1), "--wait", "60") == 0
        cases = [
            ("2-garbage", ["--file", str(deploy_models.garbage)], "load", "no workable runtime"),
            ("2-nan", ["--file", str(deploy_models.nan)], "health", "64 NaN"),
            ("2-slow", ["--file", str(deploy_models.slow), "--health", str(health_files["budget"])],
             "health", "over health.max_latency_ms"),
            ("2-wrong", ["--file", str(deploy_models.v2), "--health", str(health_files["wrong"])],
             "health", "differs from health.expected"),
        ]
        for version, args, stage, needle in cases:
            capsys.readouterr()
            mark = dev.mark()
            assert dev.deploy("--version", version, *args, "--wait", "60") == 1
            assert needle in capsys.readouterr().err
            failed = dev.event("model_failed", after=mark, version=version)
            assert failed["stage"] == stage and needle in failed["message"], failed
            dev.event("kept_serving", after=mark, version="1")
            rep = dev.version_failed(version, needle)
            assert {m["version"]: m for m in rep["models"]}["1"]["state"] == "serving"
            assert needle in rep["last_error"]
            answers(module_client, dev.id, "1", 1.0)
        # A version that passes its gate replaces the old one.
        assert dev.deploy("--version", "2", "--file", str(deploy_models.v2), "--health",
                          str(health_files["right"]), "--wait", "60") == 0
        serving = dev.event("model_serving", version="2")
        assert serving["latency_ms"] < 10_000
        answers(module_client, dev.id, "2", 2.0)
        assert dev.reported()["last_error"] is None
    finally:
        dev.close()
