"""The `ocr` task through a real agent: one version is three models (det, rec, cls) deployed
with `edge-fleet deploy --with`, loaded together, swapped together, refused together.

The models are PaddleOCR's, from the rapidocr-onnxruntime wheel (see tests/test_ocr.py).
Answers are compared with the pipeline run directly on ONNX Runtime with the same settings.
Images are small (300x90, two lines) and `det_limit_side_len` low, so a job takes well under a
second even on a loaded 2-core machine.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from edgeinfer.contract.manifest import (
    ArtifactFile,
    Health,
    ManifestError,
    ModelSpec,
    check_model,
    model_roles,
)
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InvalidArgument, NotFound
from edgeinfer.fleet.mqtt import connect, read_retained
from edgeinfer.runtimes.base import LoadOptions, Session
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT
from edgeinfer.runtimes.pipelines import build_pipeline
from tests.broker import Broker
from tests.helpers import PREFIX, Watch, deploy, reported, running_agent

pytest.importorskip("cv2", reason="opencv missing: pip install 'edgeinfer[ocr]'")

DEVICE = "gw-ocr"
FONT_FILE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
BOX_TOLERANCE_PX = 2.0
# v1 reads both lines; v3 (det at 128, stricter text_score, no cls) keeps only the line it
# reads with a score of ~0.998 and drops the other (~0.98 there).
V1_SETTINGS: dict[str, Any] = {"det_limit_side_len": 160}
V3_SETTINGS: dict[str, Any] = {"det_limit_side_len": 128, "text_score": 0.99}
DEPLOY_WAIT_S = "180"
JOB_TIMEOUT_S = 60.0


def _render(lines: list[tuple[tuple[int, int], str]], size: tuple[int, int]) -> bytes:
    if not FONT_FILE.is_file():
        pytest.skip(f"{FONT_FILE} missing (apt-get install fonts-dejavu-core)")
    font = ImageFont.truetype(str(FONT_FILE), 24)
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    for xy, text in lines:
        draw.text(xy, text, fill="black", font=font)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Models:
    folder: Path  # det.onnx, rec.onnx, cls.onnx: one version's folder as the pipeline reads it
    image: bytes  # two lines of text, PNG

    def path(self, role: str) -> Path:
        return self.folder / f"{role}.onnx"


@dataclass(frozen=True)
class Stack:
    broker: Broker
    root: Path
    models: Models
    v1: dict[str, np.ndarray]  # the pipeline's own answer with V1_SETTINGS and det, rec, cls
    agent: Any  # tests.agentproc.AgentProcess


def _run_locally(models: Models, settings: dict[str, Any], roles: tuple[str, ...],
                 image: bytes) -> dict[str, np.ndarray]:
    sessions: dict[str, Session] = {r: ORT.load(models.path(r), "CPU", LoadOptions()) for r in roles}
    try:
        pipe: Any = build_pipeline("ocr", settings, models.folder, sessions)  # run takes the mapping
        return dict(pipe.run(sessions, {"image": np.array([image], dtype=object)}))
    finally:
        for s in sessions.values():
            s.close()


def _texts(out: dict[str, np.ndarray]) -> list[str]:
    return [t.decode() if isinstance(t, bytes) else str(t) for t in out["texts"].reshape(-1)]


def _assert_same_answer(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert _texts(got) == _texts(want)
    boxes = np.asarray(got["boxes"], dtype=np.float32)
    assert boxes.shape == want["boxes"].shape
    assert np.abs(boxes - want["boxes"]).max(initial=0.0) <= BOX_TOLERANCE_PX
    np.testing.assert_allclose(np.asarray(got["scores"], np.float32), want["scores"], atol=1e-3)


def _settings_file(root: Path, name: str, settings: dict[str, Any]) -> Path:
    path = root / name
    path.write_text(json.dumps(settings))
    return path


def _ocr(client: InferenceClient, image: bytes, version: str | None = None) -> Any:
    return client.infer("ocr", {"image": np.array([image], dtype=object)}, device=DEVICE,
                        version=version, binary=True, timeout=JOB_TIMEOUT_S)


def _wait_reported(url: str, pred: Callable[[dict[str, Any]], bool],
                   timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = reported(url, DEVICE)
        except AssertionError:  # not published yet
            last = {}
        if last and pred(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"reported never matched within {timeout}s; last: {last}")


def _entry(rep: dict[str, Any], version: str) -> dict[str, Any] | None:
    return next((m for m in rep.get("models", [])
                 if m["name"] == "ocr" and m["version"] == version), None)


@pytest.fixture(scope="module")
def models(ocr_models: Path) -> Models:
    image = _render([((10, 8), "Gate 7 OPEN 42"), ((10, 50), "Pump 3 ok")], (300, 90))
    return Models(ocr_models, image)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("ocr-e2e")
    v1 = _run_locally(models, V1_SETTINGS, ("det", "rec", "cls"), models.image)
    assert len(v1["texts"]) == 2, _texts(v1)  # the image reads as two lines
    with running_agent(root, DEVICE, log={"level": "INFO"},
                       runtime={"autotune_budget_s": 2.0}) as (broker, agent):
        assert deploy(broker.url, root, "--model", "ocr", "--version", "1", "--task", "ocr",
                      "--file", str(models.path("det")),
                      "--with", f"rec.onnx={models.path('rec')}",
                      "--with", f"cls.onnx={models.path('cls')}",
                      "--settings", str(_settings_file(root, "v1.json", V1_SETTINGS)),
                      "--prefer", "onnxruntime", "--wait", DEPLOY_WAIT_S, device=DEVICE) == 0
        yield Stack(broker, root, models, v1, agent)


# --- the manifest: which file is which model ------------------------------------------------


def _spec(files: dict[str, str], **extra: Any) -> ModelSpec:
    def entry(name: str, sha: str) -> ArtifactFile:
        return ArtifactFile(name=name, uri=f"file:///m/{name}", sha256=sha * 64, size=10)

    return ModelSpec(name="ocr", version="1", uri="file:///m/det.onnx", sha256="d" * 64, size=10,
                     task="ocr", files=[entry(n, s) for n, s in files.items()], **extra)


def test_roles_come_from_the_artifact_and_the_files() -> None:
    roles = model_roles(_spec({"rec.onnx": "a", "cls.onnx": "b", "characters.txt": "c"}))
    assert roles is not None
    assert [(r.role, r.file, r.sha256[0]) for r in roles] == [
        ("det", "model.onnx", "d"), ("rec", "rec.onnx", "a"), ("cls", "cls.onnx", "b")]
    # cls is optional; det.onnx may name the artifact itself
    roles = model_roles(_spec({"rec.onnx": "a", "det.onnx": "d"}))
    assert roles is not None and [r.role for r in roles] == ["det", "rec"]
    assert model_roles(msgspec.structs.replace(_spec({}), task="tensor")) is None


@pytest.mark.parametrize(("files", "match"), [
    ({"cls.onnx": "b"}, r"missing rec\.onnx.*det, rec \(required\) and cls \(optional\)"),
    ({"rec.onnx": "a", "layout.onnx": "b"}, r"file layout\.onnx names no role"),
    ({"rec.onnx": "a", "det.onnx": "e"}, r"det model is the entry's own artifact"),
])
def test_a_version_without_its_models_is_refused(files: dict[str, str], match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        check_model(_spec(files))


def test_health_inputs_do_not_apply_to_ocr() -> None:
    raw = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.0]}]}
    spec = _spec({"rec.onnx": "a"}, health=msgspec.convert(raw, Health))
    with pytest.raises(ManifestError, match=r"health\.inputs and health\.expected do not apply"):
        check_model(spec)
    check_model(_spec({"rec.onnx": "a"}, health=Health(max_latency_ms=500)))  # this one does


# --- through the agent ----------------------------------------------------------------------


def test_deployed_version_reads_as_the_pipeline_does(stack: Stack) -> None:
    with InferenceClient(stack.broker.url) as client:
        result = _ocr(client, stack.models.image)
    assert result.model_version == "1"
    got = result.outputs
    _assert_same_answer(got, stack.v1)
    assert [t.replace(" ", "") for t in _texts(got)] == ["Gate7OPEN42", "Pump3ok"]
    assert result.parameters["runtime"] == "onnxruntime"
    entry = _entry(reported(stack.broker.url, DEVICE), "1")
    assert entry is not None and entry["state"] == "serving"
    roles = entry["roles"]
    assert list(roles) == ["det", "rec", "cls"]
    assert {r["runtime"] for r in roles.values()} == {"onnxruntime"}
    assert roles["det"]["file"] == "model.onnx" and roles["rec"]["file"] == "rec.onnx"
    assert all(r["attempts"][-1]["ok"] for r in roles.values())


def test_malformed_image_is_invalid_argument_and_the_next_job_works(stack: Stack) -> None:
    image = stack.models.image
    with InferenceClient(stack.broker.url) as client:
        with pytest.raises(InvalidArgument, match=r"ocr:1.*not a JPEG, PNG, WEBP image"):
            _ocr(client, b"this is not an image")
        with pytest.raises(InvalidArgument, match=r"ocr:1.*could not decode the PNG image"):
            _ocr(client, image[: len(image) // 2])
        ok = _ocr(client, image)
    _assert_same_answer(ok.outputs, stack.v1)


def test_a_version_missing_a_required_model_is_refused(
    stack: Stack, capsys: pytest.CaptureFixture[str],
) -> None:
    url, root = stack.broker.url, stack.root
    # edge-fleet refuses it before publishing ...
    assert deploy(url, root, "--model", "ocr", "--version", "4", "--task", "ocr",
                  "--file", str(stack.models.path("det")),
                  "--with", f"cls.onnx={stack.models.path('cls')}", device=DEVICE) == 2
    assert "missing rec.onnx" in capsys.readouterr().err
    # ... and so does the agent, should such a manifest reach it.
    topics = Topics(PREFIX, DEVICE)
    good = read_retained(url, [topics.desired], quiet_s=0.1, timeout_s=5)[topics.desired]
    manifest = json.loads(good)
    bad = json.loads(good)
    bad["revision"] = manifest["revision"] + 1
    entry = bad["models"][-1]
    entry["version"] = "4"
    entry["files"] = [f for f in entry["files"] if f["name"] != "rec.onnx"]
    with connect(url) as conn:
        conn.publish(topics.desired, json.dumps(bad).encode(), qos=1, retain=True).result(10)
        rep = _wait_reported(url, lambda r: f"manifest revision {bad['revision']} refused"
                             in (r.get("last_error") or ""))
        assert "missing rec.onnx" in rep["last_error"]
        assert "det, rec (required) and cls (optional)" in rep["last_error"]
        with InferenceClient(url) as client:
            assert _ocr(client, stack.models.image).model_version == "1"
        # Put a manifest the fleet can build on back (the same models, a new revision).
        manifest["revision"] = bad["revision"] + 1
        conn.publish(topics.desired, json.dumps(manifest).encode(), qos=1, retain=True).result(10)
    _wait_reported(url, lambda r: r.get("revision") == manifest["revision"])


def test_a_corrupt_rec_model_refuses_the_version_and_the_old_one_serves(
    stack: Stack, capsys: pytest.CaptureFixture[str],
) -> None:
    url, root = stack.broker.url, stack.root
    corrupt = root / "rec-corrupt.onnx"
    corrupt.write_bytes(stack.models.path("rec").read_bytes()[:100_000])  # cut short
    assert deploy(url, root, "--model", "ocr", "--version", "2", "--task", "ocr",
                  "--file", str(stack.models.path("det")), "--with", f"rec.onnx={corrupt}",
                  "--with", f"cls.onnx={stack.models.path('cls')}",
                  "--prefer", "onnxruntime", "--wait", DEPLOY_WAIT_S, device=DEVICE) == 1
    assert "rec model (rec.onnx)" in capsys.readouterr().err
    rep = _wait_reported(url, lambda r: (_entry(r, "2") or {}).get("state") == "failed")
    failed = _entry(rep, "2")
    assert failed is not None and "its rec model (rec.onnx)" in failed["error"]
    assert "rec model" in (rep["last_error"] or "")
    serving = _entry(rep, "1")
    assert serving is not None and serving["state"] == "serving"
    with InferenceClient(url) as client:
        result = _ocr(client, stack.models.image)
    assert result.model_version == "1"
    _assert_same_answer(result.outputs, stack.v1)


def test_settings_that_do_not_fit_refuse_the_version_when_it_loads(
    stack: Stack, capsys: pytest.CaptureFixture[str],
) -> None:
    url, root, models = stack.broker.url, stack.root, stack.models
    # The pipeline is built as the version loads, not on its first job.
    assert deploy(url, root, "--model", "ocr", "--version", "5", "--task", "ocr",
                  "--file", str(models.path("det")), "--with", f"rec.onnx={models.path('rec')}",
                  "--settings", str(_settings_file(root, "v5.json", {"det_limit": 96})),
                  "--prefer", "onnxruntime", "--wait", DEPLOY_WAIT_S, device=DEVICE) == 1
    assert "det_limit" in capsys.readouterr().err
    rep = _wait_reported(url, lambda r: (_entry(r, "5") or {}).get("state") == "failed")
    assert "known keys" in (_entry(rep, "5") or {})["error"]
    with InferenceClient(url) as client:
        result = _ocr(client, models.image)
    assert result.model_version == "1"
    _assert_same_answer(result.outputs, stack.v1)


def test_an_update_swaps_every_model_at_once(stack: Stack) -> None:
    url, root, models = stack.broker.url, stack.root, stack.models
    v3 = _run_locally(models, V3_SETTINGS, ("det", "rec"), models.image)
    assert _texts(v3) == _texts(stack.v1)[:1]  # the stricter text_score drops the second line
    events = Watch(url, Topics(PREFIX, DEVICE).events)
    try:
        # auto: each model of the version gets its own runtime choice
        assert deploy(url, root, "--model", "ocr", "--version", "3", "--task", "ocr",
                      "--file", str(models.path("det")), "--with", f"rec.onnx={models.path('rec')}",
                      "--settings", str(_settings_file(root, "v3.json", V3_SETTINGS)),
                      "--prefer", "auto", "--wait", DEPLOY_WAIT_S, device=DEVICE) == 0
        serving = events.wait_for(lambda e: e.get("type") == "model_serving"
                                  and e.get("version") == "3", timeout=60)
        events.wait_for(lambda e: e.get("type") == "model_unloaded" and e.get("version") == "1",
                        timeout=60)
    finally:
        events.close()
    assert sorted(serving["roles"]) == ["det", "rec"]
    # v1 leaves `reported` once the swap is done: only v3 (v2 failed and is no longer wanted)
    rep = _wait_reported(url, lambda r: [(m["version"], m["state"]) for m in r["models"]
                                         if m["name"] == "ocr"] == [("3", "serving")])
    entry = _entry(rep, "3")
    assert entry is not None
    roles = entry["roles"]
    assert list(roles) == ["det", "rec"]  # no cls in this version
    for role in roles.values():
        assert role["runtime"] in ("onnxruntime", "openvino")
        assert role["candidates"] and role["autotune"] is not None
    assert (entry["runtime"], entry["device"]) == (roles["det"]["runtime"], roles["det"]["device"])
    with InferenceClient(url) as client:
        result = _ocr(client, models.image)
        assert result.model_version == "3"
        _assert_same_answer(result.outputs, v3)
        with pytest.raises(NotFound, match="no version '1'"):
            _ocr(client, models.image, version="1")


def test_a_restart_serves_every_model_again_from_the_store(stack: Stack) -> None:
    url, models = stack.broker.url, stack.models
    state = Topics(PREFIX, DEVICE).state
    before = json.loads(read_retained(url, [state], quiet_s=0.1, timeout_s=5)[state])
    stack.agent.stop()
    stack.agent.start()
    deadline = time.monotonic() + 60
    while True:
        got = read_retained(url, [state], quiet_s=0.1, timeout_s=2).get(state)
        now = json.loads(got) if got else {}
        if now.get("state") == "online" and now.get("session_id") != before.get("session_id"):
            break
        assert time.monotonic() < deadline, f"agent not back online; state {now}"
        time.sleep(0.2)

    def restored(rep: dict[str, Any]) -> bool:
        # each model's auto-tuned choice was cached under its own sha256 (and the retained
        # report from before the restart said cached: false)
        entry = _entry(rep, "3") or {}
        return entry.get("state") == "serving" and all(
            r["autotune"]["cached"] for r in entry.get("roles", {}).values())

    entry = _entry(_wait_reported(url, restored), "3")
    assert entry is not None and list(entry["roles"]) == ["det", "rec"]
    v3 = _run_locally(models, V3_SETTINGS, ("det", "rec"), models.image)
    with InferenceClient(url) as client:
        result = _ocr(client, models.image)
    assert result.model_version == "3"
    _assert_same_answer(result.outputs, v3)


def test_doctor_says_ocr_needs_opencv(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"device_id": "gw-doctor", "state_dir": str(tmp_path / "state"),
                                  "broker": {"url": stack.broker.url}}))
    code = ("import sys; sys.modules['cv2'] = None\n"  # as if opencv were not installed
            "from edgeinfer.agent.cli import main\n"
            f"raise SystemExit(main(['doctor', '--config', {str(config)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("ocr:"))
    assert "unavailable: opencv unavailable" in line and "edgeinfer[ocr]" in line
