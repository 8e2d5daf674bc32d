"""Signed manifests: canonical bytes, the verifier's refusals, key files, config, the CLI."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeinfer.agent.config import ConfigError, load_config
from edgeinfer.agent.trust import TrustConfig, load_trusted_keys
from edgeinfer.agent.verifier import ManifestVerifier
from edgeinfer.contract.manifest import ManifestError, decode_manifest, decode_published
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.cli import main as fleet
from edgeinfer.fleet.mqtt import read_retained
from edgeinfer.fleet.signing import Signer, SigningError, generate_key, load_signer
from tests.broker import Broker

SHA = "ab" * 32
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def entry(**over: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"name": "digits", "version": "3", "uri": "file:///m.onnx",
                         "sha256": SHA, "size": 10}
    e.update(over)
    return e


def sign_raw(obj: dict[str, Any], key: Ed25519PrivateKey, key_id: str = "fleet-1",
             canonical: Callable[[Any], bytes] = rfc8785.dumps) -> bytes:
    """A signer that is not ours: an RFC 8785 library called directly, its own key order,
    only the fields it knows."""
    body = {k: v for k, v in obj.items() if k != "signature"}
    value = base64.b64encode(key.sign(canonical(body))).decode()
    signed = dict(obj, signature={"alg": "ed25519", "key_id": key_id, "value": value})
    return json.dumps(signed, indent=2).encode()  # whitespace and order do not matter


def pub(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {"fleet-1": Ed25519PrivateKey.generate(), "fleet-2": Ed25519PrivateKey.generate()}


def verifier(keys: dict[str, Ed25519PrivateKey], *ids: str) -> ManifestVerifier:
    trust = TrustConfig(keys={i: pub(keys[i]) for i in (ids or keys)})
    return ManifestVerifier(load_trusted_keys(trust), clock=lambda: NOW)


def refused(v: ManifestVerifier, payload: bytes, applied: int | None = None) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        v.check(decode_published(payload), applied)
    return info.value


# --- what the signature covers -------------------------------------------------------------


def test_signature_covers_the_published_object_not_the_decoded_defaults(keys: dict[str, Any]) -> None:
    # The signer knows no defaults (no task, batching, ...); the agent's structs add them.
    # The signature still verifies, because it covers the object as published.
    payload = sign_raw({"revision": 4, "models": [entry()], "issued_at": "2026-11-23T10:00:00Z"},
                       keys["fleet-1"])
    published = decode_published(payload)
    assert published.manifest.models[0].task == "tensor"  # a default the signer never wrote
    assert b"tensor" not in published.signed_bytes
    verifier(keys).check(published, applied_revision=3)
    # And one that writes every default explicitly agrees with the agent too.
    full = sign_raw({"revision": 5, "models": [entry(task="tensor", instances=1,
                     batching={"max_batch": 1, "max_delay_ms": 0.0})]}, keys["fleet-1"])
    verifier(keys).check(decode_published(full), applied_revision=3)


def test_signatures_made_before_rfc8785_still_verify(keys: dict[str, Any]) -> None:
    """The canonical form was Python's sorted json.dumps before it was declared RFC 8785;
    for manifests of integers and ASCII strings (what edge-fleet wrote) the bytes agree."""
    def old_canonical(body: Any) -> bytes:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    body = {"revision": 6, "issued_at": "2026-11-23T10:00:00Z",
            "models": [entry(task="tensor", instances=2, batching={"max_batch": 8})]}
    verifier(keys).check(decode_published(sign_raw(body, keys["fleet-1"],
                                                   canonical=old_canonical)), None)


def test_our_signer_round_trips(keys: dict[str, Any]) -> None:
    floats = [0.1, 1e-05, 2.0, 1 / 3, 123456.789e10]
    health = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5], "data": floats}],
              "expected": [{"name": "y", "datatype": "FP32", "shape": [5], "data": floats}],
              "max_latency_ms": 12.5}
    manifest = decode_manifest(json.dumps(
        {"revision": 2, "models": [entry(health=health)], "expires_at": "2027-01-01T00:00:00Z",
         "issued_at": "2026-11-23T10:00:00Z"}).encode())
    payload = Signer("fleet-1", keys["fleet-1"]).sign(manifest)
    published = decode_published(payload)
    assert published.manifest.signature is not None
    assert published.manifest.signature.key_id == "fleet-1"
    verifier(keys).check(published, None)


def test_refusals_name_their_reason(keys: dict[str, Any]) -> None:
    v = verifier(keys)
    body = {"revision": 7, "models": [entry()]}
    assert refused(v, json.dumps(body).encode()).reason == "unsigned"
    good = sign_raw(body, keys["fleet-1"])
    # Altered after signing: another artifact behind the same signature.
    tampered = good.replace(SHA.encode(), b"cd" * 32)
    err = refused(v, tampered)
    assert err.reason == "bad_signature" and "does not match" in str(err)
    # Signed by a key this agent does not know, under a name it does know.
    err = refused(v, sign_raw(body, Ed25519PrivateKey.generate(), "fleet-1"))
    assert err.reason == "bad_signature"
    err = refused(v, sign_raw(body, Ed25519PrivateKey.generate(), "fleet-9"))
    assert err.reason == "unknown_key" and "fleet-9" in str(err) and "fleet-1, fleet-2" in str(err)
    doc = json.loads(good)
    doc["signature"]["alg"] = "rsa"
    assert refused(v, json.dumps(doc).encode()).reason == "unsupported_algorithm"
    doc["signature"] = {"alg": "ed25519", "key_id": "fleet-1", "value": "not base64!"}
    assert refused(v, json.dumps(doc).encode()).reason == "bad_signature"
    # Rollback: lower than the applied revision; the same revision is fine.
    err = refused(v, good, applied=8)
    assert err.reason == "rollback" and "lower than the applied revision 8" in str(err)
    v.check(decode_published(good), 7)


def test_rotation_trusts_two_keys_at_once(keys: dict[str, Any]) -> None:
    body = {"revision": 1, "models": [entry()]}
    both = verifier(keys)
    both.check(decode_published(sign_raw(body, keys["fleet-1"], "fleet-1")), None)
    both.check(decode_published(sign_raw(body, keys["fleet-2"], "fleet-2")), None)
    old_gone = verifier(keys, "fleet-2")
    assert refused(old_gone, sign_raw(body, keys["fleet-1"], "fleet-1")).reason == "unknown_key"


def test_expiry(keys: dict[str, Any]) -> None:
    v = verifier(keys)
    past = (NOW - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    future = "2026-11-23T11:00:00.5+01:00"  # 10:00:00.5 UTC: half a second left
    expired = sign_raw({"revision": 3, "models": [entry()], "expires_at": past}, keys["fleet-1"])
    err = refused(v, expired, applied=2)
    assert err.reason == "expired" and past in str(err)
    # Read again after a restart, the applied revision is not refused for its age.
    v.check(decode_published(expired), 3)
    v.check(decode_published(
        sign_raw({"revision": 3, "models": [entry()], "expires_at": future}, keys["fleet-1"])), 2)
    # Without keys an expired manifest is refused too; unsigned ones are accepted.
    open_door = ManifestVerifier({}, clock=lambda: NOW)
    assert refused(open_door, expired, applied=2).reason == "expired"
    open_door.check(decode_published(json.dumps({"revision": 6, "models": [entry()]}).encode()), 5)
    with pytest.raises(ManifestError, match="RFC 3339"):
        decode_published(json.dumps({"revision": 1, "models": [], "expires_at": "tomorrow"}).encode())


def test_revisions_only_move_forward(keys: dict[str, Any]) -> None:
    """With keys: lower is refused, the applied revision with other content too (even
    expired), with the same content it is the re-delivery every reconnect makes. Without
    keys a lower revision is refused unless deploy.allow_rollback says otherwise."""
    past = (NOW - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    applied = decode_published(sign_raw({"revision": 3, "models": [entry()]}, keys["fleet-1"]))
    v = verifier(keys)
    v.check(applied, 3, applied.digest)
    # Signed again by the other key: the same content, the same digest.
    v.check(decode_published(sign_raw({"revision": 3, "models": [entry()]}, keys["fleet-2"],
                                      "fleet-2")),
            3, applied.digest)
    other = sign_raw({"revision": 3, "models": [entry(instances=2)]}, keys["fleet-1"])
    err = refused_at(v, other, 3, applied.digest)
    assert err.reason == "reused_revision"
    old = sign_raw({"revision": 3, "models": [entry(instances=2)], "expires_at": past},
                   keys["fleet-1"])
    assert refused_at(v, old, 3, applied.digest).reason == "reused_revision"
    # The applied manifest itself, delivered again after it expired, changes nothing.
    expired = decode_published(sign_raw({"revision": 3, "models": [entry()],
                                         "expires_at": past}, keys["fleet-1"]))
    v.check(expired, 3, expired.digest)
    unsigned_low = json.dumps({"revision": 2, "models": [entry()]}).encode()
    assert refused_at(ManifestVerifier({}), unsigned_low, 3, None).reason == "rollback"
    ManifestVerifier({}, allow_rollback=True).check(decode_published(unsigned_low), 3)
    # allow_rollback does not open a door that keys close.
    low = sign_raw({"revision": 2, "models": [entry()]}, keys["fleet-1"])
    keyed = ManifestVerifier(load_trusted_keys(TrustConfig(keys={"fleet-1": pub(keys["fleet-1"])})),
                             clock=lambda: NOW, allow_rollback=True)
    assert refused_at(keyed, low, 3, applied.digest).reason == "rollback"


def refused_at(v: ManifestVerifier, payload: bytes, applied: int,
               digest: str | None) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        v.check(decode_published(payload), applied, digest)
    return info.value


# --- keys and config -----------------------------------------------------------------------


def test_generate_writes_a_private_key_only_we_can_read(tmp_path: Path) -> None:
    files = generate_key("fleet-1", tmp_path / "keys")
    assert stat.S_IMODE(files.private.stat().st_mode) == 0o600
    assert files.public.read_text().strip() == files.public_b64
    signer = load_signer(files.private)
    assert signer.key_id == "fleet-1" and signer.public_b64 == files.public_b64
    with pytest.raises(SigningError, match="exists"):
        generate_key("fleet-1", tmp_path / "keys")
    files.private.chmod(0o644)
    with pytest.raises(SigningError, match="chmod 600"):
        load_signer(files.private)
    with pytest.raises(SigningError, match="must match"):
        generate_key("../evil", tmp_path)


def test_agent_config_trust_section(tmp_path: Path, keys: dict[str, Any]) -> None:
    pem = keys["fleet-2"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "fleet-2.pem").write_bytes(pem)
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text(json.dumps({"trust": {
        "keys": {"fleet-1": pub(keys["fleet-1"])},
        "key_files": {"fleet-2": str(tmp_path / "fleet-2.pem")},
    }}))
    cfg = load_config(cfg_file, environ={})
    assert sorted(load_trusted_keys(cfg.trust)) == ["fleet-1", "fleet-2"]

    def bad(trust: dict[str, Any], needle: str) -> None:
        cfg_file.write_text(json.dumps({"trust": trust}))
        with pytest.raises(ConfigError, match=needle) as info:
            load_config(cfg_file, environ={})
        assert str(cfg_file) in str(info.value)

    bad({"keys": {"fleet-1": "abc"}}, r"key 'trust.keys.fleet-1': not base64")
    bad({"keys": {"fleet-1": base64.b64encode(b"x" * 31).decode()}}, "31 bytes")
    bad({"key_files": {"fleet-3": str(tmp_path / "none.pub")}}, r"trust.key_files.fleet-3'.*cannot read")
    bad({"keys": {"bad id!": pub(keys["fleet-1"])}}, "key id must match")
    bad({"secret": 1}, r"key 'trust.secret'")


# --- the CLI -------------------------------------------------------------------------------


def test_keys_generate_and_signed_deploy(broker: Broker, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert fleet(["keys", "generate", "--key-id", "fleet-1", "--out", str(tmp_path / "k")]) == 0
    printed = capsys.readouterr().out
    public = (tmp_path / "k" / "fleet-1.pub").read_text().strip()
    assert printed.strip().splitlines()[-1] == public
    assert f"trust: {{keys: {{fleet-1: {public}}}}}" in printed
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really onnx")
    topics = Topics("edge/v1", "gw-sign")
    art = ["--artifact-dir", str(tmp_path / "art")]
    assert fleet(["deploy", "--broker", broker.url, "--device", "gw-sign", "--model", "m",
                  "--version", "1", "--file", str(model), *art,
                  "--sign-key", str(tmp_path / "k" / "fleet-1.key")]) == 0
    v = ManifestVerifier(load_trusted_keys(TrustConfig(keys={"fleet-1": public})))
    payload = read_retained(broker.url, [topics.desired])[topics.desired]
    published = decode_published(payload)
    v.check(published, None)
    assert published.manifest.revision == 1
    # $EDGE_FLEET_SIGNING_KEY, and --key-id naming the key differently.
    monkeypatch.setenv("EDGE_FLEET_SIGNING_KEY", str(tmp_path / "k" / "fleet-1.key"))
    assert fleet(["deploy", "--broker", broker.url, "--device", "gw-sign", "--model", "m",
                  "--version", "2", "--file", str(model), *art, "--key-id", "fleet-x"]) == 0
    published = decode_published(read_retained(broker.url, [topics.desired])[topics.desired])
    assert published.manifest.signature is not None
    assert published.manifest.signature.key_id == "fleet-x"
    assert refused(v, payload=read_retained(broker.url, [topics.desired])[topics.desired]
                   ).reason == "unknown_key"
    monkeypatch.delenv("EDGE_FLEET_SIGNING_KEY")
    capsys.readouterr()
    assert fleet(["deploy", "--broker", broker.url, "--device", "gw-sign", "--remove", "m",
                  "--sign-key", str(tmp_path / "k" / "missing.key")]) == 2
    assert "cannot read signing key" in capsys.readouterr().err
