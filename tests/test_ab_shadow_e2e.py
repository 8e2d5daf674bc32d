"""A/B and shadow versions end to end: a real mosquitto, one real agent process for the
module, versions deployed with the real `edge-fleet deploy --traffic/--shadow`, real ONNX
Runtime sessions of y = x (version 1) and y = 2x (version 2, bench/models.py).

The tests run in order on the one agent: the A/B split, a bad split refused while the
good one keeps serving, then version 2 as version 1's shadow.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import build_scaled
from edgeinfer.contract.manifest import Manifest, encode_manifest
from edgeinfer.contract.traffic import pick_version
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.mqtt import connect
from tests.broker import Broker
from tests.deploydevice import MODEL, PREFIX, Device, X, publish, publish_raw, spec
from tests.helpers import Watch

DEVICE = "gw-ab"
ZERO = np.zeros((1, 64), np.float32)


@pytest.fixture(scope="module")
def files(model_dir: Path) -> tuple[Path, Path]:
    return build_scaled(model_dir, 1.0, "one.onnx"), build_scaled(model_dir, 2.0, "two.onnx")


@pytest.fixture(scope="module")
def dev(module_broker: Broker, files: tuple[Path, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    """The agent, serving version 1 then 2 at 70/30 (by the CLI's --traffic)."""
    d = Device(tmp_path_factory.mktemp("ab"), module_broker, DEVICE,
               runtime={"prefer": ["onnxruntime"]})
    d.start()
    try:
        one, two = files
        assert d.deploy("--version", "1", "--file", str(one), "--wait", "30") == 0
        assert d.deploy("--version", "2", "--file", str(two), "--traffic", "1=70",
                        "--traffic", "2=30", "--wait", "30") == 0
        yield d
    finally:
        d.close()


def _run(client: InferenceClient, ids: list[str], x: np.ndarray,
         version: str | None = None) -> dict[str, tuple[str | None, np.ndarray]]:
    """Jobs sent together: job id -> (the version that answered, its y)."""
    futures = {i: client.submit(MODEL, {"x": x}, device=DEVICE, job_id=i, version=version,
                                timeout=20) for i in ids}
    return {i: (r.model_version, r.outputs["y"])
            for i, r in ((i, f.result(25)) for i, f in futures.items())}


def _split(client: InferenceClient, ids: list[str]) -> None:
    """Each job that names no version gets the version pick_version gives its id."""
    got = _run(client, ids, X)
    for i, (version, y) in got.items():
        assert version == pick_version([("1", 70), ("2", 30)], i), i
        np.testing.assert_array_equal(y, X * float(version))


def test_unnamed_jobs_split_70_30_by_job_id_and_named_jobs_get_their_version(
        dev: Device, module_client: InferenceClient) -> None:
    models = {m["version"]: m for m in dev.reported()["models"]}
    assert (models["1"].get("traffic"), models["2"].get("traffic")) == (70, 30)
    ids = [f"ab-{n}" for n in range(40)]
    _split(module_client, ids)
    share = sum(pick_version([("1", 70), ("2", 30)], i) == "2" for i in ids) / len(ids)
    assert 0.15 <= share <= 0.45, share  # both versions answer, near 30% (exactly: unit test)
    for version in ("1", "2"):
        got = _run(module_client, [f"named-{version}-{n}" for n in range(2)], X, version)
        assert {v for v, _ in got.values()} == {version}


def test_weights_that_do_not_add_up_are_refused_and_the_split_keeps_serving(
        dev: Device, module_client: InferenceClient, files: tuple[Path, Path]) -> None:
    before = dev.reported()["revision"]
    # The CLI refuses before publishing...
    assert dev.deploy("--version", "2", "--file", str(files[1]), "--traffic", "1=60",
                      "--traffic", "2=30") == 1
    # ...and the agent refuses such a manifest published by hand.
    mark = dev.mark()
    manifest = json.loads(encode_manifest(_manifest(before + 1, files, (60, 30))))
    publish_raw(dev, json.dumps(manifest).encode())
    event = dev.event("manifest_rejected", after=mark, revision=before + 1)
    assert "the traffic of m's versions adds up to 90, not 100" in event["message"]
    rep = dev.reported()
    assert rep["revision"] == before
    assert "adds up to 90" in rep["last_error"]
    _split(module_client, [f"after-refusal-{n}" for n in range(10)])
    # The operator's fix: a good manifest over the refused one (the CLI reads it next).
    publish(dev, _manifest(before + 2, files, (70, 30)))
    dev.event("deploy_finished", after=mark, revision=before + 2)


def _manifest(revision: int, files: tuple[Path, Path], weights: tuple[int, int]) -> Manifest:
    one, two = files
    return Manifest(revision=revision, models=[spec(one, "1", traffic=weights[0]),
                                               spec(two, "2", traffic=weights[1])])


def test_a_shadow_gets_a_copy_of_each_unnamed_job_and_its_agreement_is_reported(
        dev: Device, module_client: InferenceClient, files: tuple[Path, Path]) -> None:
    telemetry = Watch(dev.url, dev.topics.telemetry)
    replies: list[bytes] = []  # every message to any reply topic, answers and all
    lock = threading.Lock()

    def on_reply(msg: Any) -> None:
        with lock:
            replies.append(msg.payload)

    answers = connect(dev.url)
    answers.subscribe(f"{PREFIX}/reply/#", on_reply)
    try:
        assert dev.deploy("--version", "2", "--file", str(files[1]), "--shadow", "2",
                          "--wait", "30") == 0
        models = {m["version"]: m for m in dev.reported()["models"]}
        assert models["2"].get("shadow") is True and "traffic" not in models["1"]
        # Named jobs are not copied: version 2 answers its own, version 1 its own.
        assert {v for v, _ in _run(module_client, ["to-2"], X, "2").values()} == {"2"}
        assert {v for v, _ in _run(module_client, ["to-1"], X, "1").values()} == {"1"}
        # 12 jobs naming no version: only version 1 answers them; 2x agrees with x
        # (allclose) only on the 4 zero inputs.
        got = _run(module_client, [f"z-{n}" for n in range(4)], ZERO)
        got |= _run(module_client, [f"x-{n}" for n in range(8)], X)
        assert {v for v, _ in got.values()} == {"1"}
        for i, (_, y) in got.items():
            np.testing.assert_array_equal(y, ZERO if i.startswith("z-") else X)

        def done(doc: dict[str, Any]) -> bool:
            fig = doc.get("inference", {}).get("shadows", {}).get(f"{MODEL}:2", {})
            return bool(fig.get("compared", 0) + fig.get("errors", 0) >= 12)

        fig = telemetry.wait_for(done, timeout=20)["inference"]["shadows"][f"{MODEL}:2"]
        assert (fig["compared"], fig["agreed"], fig["agreement"]) == (12, 4, 0.3333)
        assert (fig["dropped"], fig["errors"], fig["compare"]) == (0, 0, "allclose")
        assert fig["shadow_ms"]["p50"] > 0 and fig["shadow_ms"]["p95"] >= fig["shadow_ms"]["p50"]
        assert fig["serving_ms"]["p50"] > 0
        # reported: the shadow's entry, refreshed at the telemetry's pace.
        stats = _shadow_stats(dev, 12)
        assert (stats["compared"], stats["agreed"], stats["dropped"]) == (12, 4, 0)
        assert "shadow_stats" not in {m["version"]: m for m in dev.reported()["models"]}["1"]
        # One answer per job (14), none from the shadow's copies.
        with lock:
            assert len(replies) == 14, replies
    finally:
        telemetry.close()
        answers.close()


def _shadow_stats(dev: Device, compared: int) -> dict[str, Any]:
    """The shadow's `shadow_stats` in `reported`, once they count `compared` copies."""
    deadline = time.monotonic() + 10
    while True:
        entry = {m["version"]: m for m in dev.reported()["models"]}["2"]
        stats: dict[str, Any] = entry.get("shadow_stats", {})
        if stats.get("compared") == compared:
            return stats
        assert time.monotonic() < deadline, entry
        time.sleep(0.1)
