"""Task pipelines on real runtimes and real media: images through pillow, audio through
soundfile and Silero VAD, embeddings against numpy; malformed media; the task registry."""

from __future__ import annotations

import ast
import io
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from bench.models import (
    DigitsModel,
    EncoderModel,
    build_digits,
    build_digits_float,
    build_encoder,
    build_mlp,
    silero_vad_path,
)
from edgeinfer.runtimes.base import LoadOptions, Session, TensorSpec
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import KNOWN_TASKS, build_pipeline, pipeline_requirements
from edgeinfer.runtimes.pipelines.audio import SAMPLE_RATE, VadSettings, resample, speech_timestamps

OPTS = LoadOptions(threads=1)
# ORT and OpenVINO (CPU held to f32) differ only by summation order: as in test_runtimes.
RTOL, ATOL = 1e-4, 1e-5
# The digits' 0..16 pixels are stored as round(v * 255 / 16) in the PNGs and scaled back.
DIGITS_SETTINGS: dict[str, Any] = {"color": "L", "size": [8, 8], "scale": 16 / 255, "top_k": 3}


def _bytes(*items: bytes) -> np.ndarray:
    return np.array(list(items), dtype=object)


def _png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _digit_pngs(x: np.ndarray) -> list[bytes]:
    return [_png(np.rint(row.reshape(8, 8) * 255 / 16)) for row in x]


class FakeSession:
    """A session that records what it was given and answers with fixed scores."""

    runtime = "fake"
    device = "CPU"

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 answer: np.ndarray | None = None) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.answer = answer
        self.seen: list[dict[str, np.ndarray]] = []

    def infer(self, inputs: Mapping[str, np.ndarray],
              outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.seen.append(dict(inputs))
        first = next(iter(inputs.values()))
        answer = self.answer if self.answer is not None else np.zeros((first.shape[0], 3), np.float32)
        return {self.outputs[0].name: answer}

    def close(self) -> None:
        pass


def _image_session(shape: tuple[int, ...], classes: int = 3, answer: np.ndarray | None = None,
                   datatype: str = "FP32") -> FakeSession:
    return FakeSession([TensorSpec("pixels", datatype, shape)],
                       [TensorSpec("scores", "FP32", (-1, classes))], answer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline-models")


@pytest.fixture(scope="module")
def digits(model_dir: Path) -> DigitsModel:
    return build_digits(model_dir)


@pytest.fixture(scope="module")
def digits_float(model_dir: Path) -> DigitsModel:
    return build_digits_float(model_dir)


# --- registry ---------------------------------------------------------------------------


def test_unknown_task_names_the_known_ones(model_dir: Path) -> None:
    session = ORT_CPU.load(build_mlp(model_dir), "CPU", OPTS)
    with pytest.raises(ValueError, match="unknown task 'chat'; known tasks: tensor, image-classification"):
        build_pipeline("chat", {}, None, session)


def test_requirements_report_missing_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(pipeline_requirements()) == set(KNOWN_TASKS)
    assert all(v is None for v in pipeline_requirements().values())  # the dev extra has both
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    req = pipeline_requirements()
    assert req["tensor"] is None and req["embedding"] is None
    assert req["image-classification"] is not None
    assert req["image-classification"].startswith("pillow unavailable: ModuleNotFoundError")
    assert "edgeinfer[media]" in req["image-classification"]
    assert req["voice-activity-detection"] is not None
    assert req["voice-activity-detection"].startswith("soundfile unavailable")
    session = _image_session((-1, 3, 4, 4))
    with pytest.raises(ValueError, match="task image-classification cannot run here: pillow unavailable"):
        build_pipeline("image-classification", {}, None, session)


def test_unknown_settings_key_is_named() -> None:
    session = _image_session((-1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"key 'mena': unknown key \(known keys: input, output"):
        build_pipeline("image-classification", {"mena": [0.5]}, None, session)
    with pytest.raises(ValueError, match=r"image-classification settings: key 'top_k': "
                                         r"expected an integer >= 1, got 'five'"):
        build_pipeline("image-classification", {"top_k": "five"}, None, session)


# --- tensor -----------------------------------------------------------------------------


def test_tensor_is_identity(model_dir: Path) -> None:
    session = ORT_CPU.load(build_mlp(model_dir), "CPU", OPTS)
    pipe = build_pipeline("tensor", {}, None, session)
    assert pipe.task == "tensor"
    assert pipe.inputs() == session.inputs and pipe.outputs() == session.outputs
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(pipe.run(session, {"x": x})["y"], session.infer({"x": x})["y"])
    with pytest.raises(ValueError, match="takes no settings"):
        build_pipeline("tensor", {"scale": 1}, None, session)


# --- image classification ---------------------------------------------------------------


def test_digits_png_accuracy_matches_sklearn(digits: DigitsModel) -> None:
    """skl2onnx's digits model (probabilities FP32 + label INT64) fed with PNGs."""
    session = ORT_CPU.load(digits.path, "CPU", OPTS)
    pipe = build_pipeline("image-classification", DIGITS_SETTINGS, None, session)
    out = pipe.run(session, {"image": _bytes(*_digit_pngs(digits.x_test))})
    pred = out["classes"][:, 0]
    assert out["labels"].shape == out["scores"].shape == (len(digits.y_test), 3)
    assert [b.decode() for b in out["labels"][:, 0]] == [str(p) for p in pred]
    assert np.all(np.diff(out["scores"], axis=1) <= 0)  # best first
    acc, sk_acc = (pred == digits.y_test).mean(), (digits.sklearn_pred == digits.y_test).mean()
    assert acc == sk_acc, (acc, sk_acc)
    assert (pred == digits.sklearn_pred).mean() >= 0.99


@pytest.mark.parametrize("backend", [ORT_CPU, OPENVINO], ids=["onnxruntime", "openvino"])
def test_digits_float_on_both_runtimes(digits_float: DigitsModel, backend: Any) -> None:
    session = backend.load(digits_float.path, "CPU", OPTS)
    pipe = build_pipeline("image-classification", DIGITS_SETTINGS, None, session)
    out = pipe.run(session, {"image": _bytes(*_digit_pngs(digits_float.x_test))})
    acc = (out["classes"][:, 0] == digits_float.y_test).mean()
    assert acc == (digits_float.sklearn_pred == digits_float.y_test).mean()


def test_digits_float_ort_and_openvino_agree(digits_float: DigitsModel) -> None:
    pngs = _bytes(*_digit_pngs(digits_float.x_test))
    answers = []
    for backend in (ORT_CPU, OPENVINO):
        session = backend.load(digits_float.path, "CPU", OPTS)
        answers.append(build_pipeline("image-classification", DIGITS_SETTINGS, None, session)
                       .run(session, {"image": pngs}))
    ort, ov = answers
    np.testing.assert_array_equal(ort["classes"], ov["classes"])
    np.testing.assert_allclose(ort["scores"], ov["scores"], rtol=RTOL, atol=ATOL)


def test_layout_channels_scale_and_crop() -> None:
    # 4 wide x 2 high, each pixel distinct per channel: R = 10*x, G = 100 + y, B = 200.
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[:, :, 0] = np.arange(4) * 10
    rgb[:, :, 1] = 100 + np.arange(2)[:, None]
    rgb[:, :, 2] = 200
    png = _png(rgb, "RGB")

    nchw = _image_session((-1, 3, 2, 4))
    build_pipeline("image-classification", {"scale": 1.0}, None, nchw).run(nchw, {"image": _bytes(png)})
    x = nchw.seen[0]["pixels"]
    assert x.shape == (1, 3, 2, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], rgb.transpose(2, 0, 1))

    nhwc = _image_session((-1, 2, 4, 3))
    settings = {"scale": 1.0, "color": "BGR", "mean": [1, 2, 3], "std": [2, 2, 2]}
    build_pipeline("image-classification", settings, None, nhwc).run(nhwc, {"image": _bytes(png)})
    want = (rgb[:, :, ::-1].astype(np.float32) - [1, 2, 3]) / 2
    np.testing.assert_array_equal(nhwc.seen[0]["pixels"][0], want)

    # Centre crop: a 2x2 model input takes the middle two columns of the 4x2 image.
    crop = _image_session((-1, 3, 2, 2))
    settings = {"scale": 1.0, "interpolation": "nearest"}
    build_pipeline("image-classification", settings, None, crop).run(crop, {"image": _bytes(png)})
    np.testing.assert_array_equal(crop.seen[0]["pixels"][0], rgb[:, 1:3].transpose(2, 0, 1))

    # Stretch: all four columns squeezed into two (nearest takes columns 0 and 2 or 1 and 3).
    stretch = _image_session((-1, 3, 2, 2))
    build_pipeline("image-classification", {**settings, "resize": "stretch"}, None, stretch).run(
        stretch, {"image": _bytes(png)})
    assert set(stretch.seen[0]["pixels"][0, 0, 0]) <= {0, 10, 20, 30}
    assert stretch.seen[0]["pixels"][0, 0, 0, 0] < stretch.seen[0]["pixels"][0, 0, 0, 1]


def test_crop_ratio_like_torchvision_resize_then_center_crop() -> None:
    """crop_ratio 0.5 on a 8x8 image into 2x2: resize to 4x4, keep the middle 2x2."""
    img = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10, np.ones((2, 2), np.uint8))
    session = _image_session((-1, 1, 2, 2))
    settings = {"color": "L", "scale": 1.0, "crop_ratio": 0.5, "interpolation": "nearest"}
    build_pipeline("image-classification", settings, None, session).run(
        session, {"image": _bytes(_png(img))})
    np.testing.assert_array_equal(session.seen[0]["pixels"][0, 0], [[50, 60], [90, 100]])


def test_jpeg_webp_and_uint8_models() -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8), "RGB")
    session = _image_session((1, 16, 16, 3), datatype="UINT8")  # fixed batch of 1: one call each
    pipe = build_pipeline("image-classification", {"scale": 1.0}, None, session)
    images = _bytes(_encode(photo, "JPEG", quality=90), _encode(photo, "WEBP"), _encode(photo, "PNG"))
    out = pipe.run(session, {"image": images})
    assert out["labels"].shape == (3, 3)
    assert len(session.seen) == 3
    assert all(s["pixels"].shape == (1, 16, 16, 3) and s["pixels"].dtype == np.uint8
               for s in session.seen)
    # JPEG and WebP are lossy; the three come out close but not equal.
    a, b, c = (s["pixels"].astype(np.int16) for s in session.seen)
    assert np.abs(a - c).mean() < 8 and np.abs(b - c).mean() < 8


def test_labels_top_k_and_softmax(tmp_path: Path) -> None:
    logits = np.array([[1.0, 3.0, 2.0, 0.0]], np.float32)
    session = _image_session((-1, 1, 4, 4), classes=4, answer=logits)
    png = _png(np.zeros((4, 4)))
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n\nfish\n")
    out = build_pipeline("image-classification", {"color": "L", "top_k": 2, "softmax": True},
                         tmp_path, session).run(session, {"image": _bytes(png)})
    assert out["labels"].tolist() == [[b"dog", b"bird"]]
    assert out["classes"].tolist() == [[1, 2]]
    z = np.exp(logits - logits.max())
    np.testing.assert_allclose(out["scores"], [(z / z.sum())[0, [1, 2]]], rtol=1e-6)

    out = build_pipeline("image-classification", {"color": "L", "labels": ["a", "b", "c", "d"],
                                                   "top_k": 10}, None, session).run(
        session, {"image": _bytes(png)})
    assert out["labels"].tolist() == [[b"b", b"c", b"a", b"d"]]  # top_k capped at the classes

    with pytest.raises(ValueError, match="3 labels for 4 classes"):
        build_pipeline("image-classification", {"color": "L", "labels": ["a", "b", "c"]}, None, session)
    with pytest.raises(ValueError, match="plain file name inside the model's folder"):
        build_pipeline("image-classification", {"color": "L", "labels_file": "../x.txt"}, tmp_path,
                       session)


def test_settings_that_do_not_fit_the_model() -> None:
    with pytest.raises(ValueError, match="set size"):
        build_pipeline("image-classification", {}, None, _image_session((-1, 64)))
    with pytest.raises(ValueError, match="gives 192 values; input pixels takes 64"):
        build_pipeline("image-classification", {"size": [8, 8]}, None, _image_session((-1, 64)))
    with pytest.raises(ValueError, match="has 3 channel"):
        build_pipeline("image-classification", {"color": "L"}, None, _image_session((-1, 3, 8, 8)))
    with pytest.raises(ValueError, match="mean needs 1 or 3 values"):
        build_pipeline("image-classification", {"mean": [1, 2]}, None, _image_session((-1, 3, 8, 8)))
    with pytest.raises(ValueError, match="dynamic size; set size"):
        build_pipeline("image-classification", {}, None, _image_session((-1, 3, -1, -1)))


# --- malformed media --------------------------------------------------------------------


def test_malformed_images_are_refused_and_the_next_call_works(digits_float: DigitsModel) -> None:
    session = ORT_CPU.load(digits_float.path, "CPU", OPTS)
    pipe = build_pipeline("image-classification", DIGITS_SETTINGS, None, session)
    good = _digit_pngs(digits_float.x_test[:1])[0]
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8), "L")
    jpeg = _encode(photo, "JPEG")
    bad = {
        "truncated JPEG": (jpeg[: len(jpeg) // 2], r"image\[0\]: could not decode the JPEG image"),
        "JPEG cut in its header": (jpeg[:100], r"image\[0\]: could not decode the JPEG image"),
        "truncated PNG": (good[:60], r"image\[0\]: could not decode the PNG image"),
        "empty": (b"", r"image\[0\] is empty"),
        "text": (b"hello, world", r"image\[0\]: not a JPEG, PNG, WEBP image \(first bytes 68656c6c"),
        "GIF": (_encode(photo, "GIF"), r"not a JPEG, PNG, WEBP image"),
    }
    for name, (data, reason) in bad.items():
        with pytest.raises(ValueError, match=reason):
            pipe.run(session, {"image": _bytes(data)})
        out = pipe.run(session, {"image": _bytes(good)})
        assert out["classes"][0, 0] == digits_float.sklearn_pred[0], name
    with pytest.raises(ValueError, match=r"image\[1\] must hold the bytes"):
        pipe.run(session, {"image": np.array([good, 3], dtype=object)})
    with pytest.raises(ValueError, match="missing input 'image'"):
        pipe.run(session, {"x": _bytes(good)})


def test_huge_image_refused_before_decoding() -> None:
    session = _image_session((-1, 1, 8, 8))
    pipe = build_pipeline("image-classification", {"color": "L", "max_pixels": 1000}, None, session)
    with pytest.raises(ValueError, match="image of 100x100 pixels is over the limit of 1000"):
        pipe.run(session, {"image": _bytes(_png(np.zeros((100, 100))))})


# --- voice activity detection -----------------------------------------------------------


def _silero_reference() -> Any:
    """silero-vad's own `get_speech_timestamps_from_probs`, taken from its source file
    without importing the package (which imports torch)."""
    source = (silero_vad_path().parent.parent / "utils_vad.py").read_text()
    tree = ast.parse(source)
    func = next(n for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name == "get_speech_timestamps_from_probs")
    namespace: dict[str, Any] = {"List": list, "Callable": Any}
    exec(compile(ast.Module([func], type_ignores=[]), "utils_vad.py", "exec"), namespace)
    return namespace["get_speech_timestamps_from_probs"]


@pytest.mark.parametrize("seed", range(6))
def test_speech_timestamps_match_silero_source(seed: int) -> None:
    reference = _silero_reference()
    rng = np.random.default_rng(seed)
    # Smoothed random probabilities: runs of speech and silence of varied lengths.
    probs = np.convolve(rng.random(600), np.ones(9) / 9, mode="same")
    probs = np.clip((probs - 0.5) * 4 + 0.5, 0, 1).tolist()
    n_samples = len(probs) * 512 - int(rng.integers(0, 512))
    variants: list[dict[str, Any]] = [
        {},
        {"threshold": 0.6, "min_silence_duration_ms": 300, "speech_pad_ms": 100},
        {"max_speech_duration_s": 2.0},
        {"max_speech_duration_s": 1.5, "use_max_poss_sil_at_max_speech": False},
        {"min_speech_duration_ms": 0, "neg_threshold": 0.2},
    ]
    for kw in variants:
        ours = speech_timestamps(probs, VadSettings(**kw), n_samples)
        ref_kw = dict(kw)
        if "max_speech_duration_s" not in ref_kw:
            ref_kw["max_speech_duration_s"] = float("inf")
        theirs = reference(probs, sampling_rate=16000, audio_length_samples=n_samples, **ref_kw)
        assert ours == [(s["start"], s["end"]) for s in theirs], kw


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_keeps_a_tone_and_drops_aliases(rate: int) -> None:
    t = np.arange(rate) / rate
    y = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), rate)
    assert y.size == SAMPLE_RATE and y.dtype == np.float32
    want = np.sin(2 * np.pi * 440 * np.arange(y.size) / SAMPLE_RATE)
    assert np.abs(y - want)[64:-64].max() < 1e-3
    if rate > 2 * 9000:  # 9 kHz is above the new Nyquist frequency: filtered out, not folded
        z = resample(np.sin(2 * np.pi * 9000 * t).astype(np.float32), rate)
        assert np.sqrt(np.mean(z[64:-64] ** 2)) < 1e-3


@pytest.fixture(scope="module")
def vad() -> Session:
    return ORT_CPU.load(silero_vad_path(), "CPU", OPTS)


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, int, list[tuple[float, float]]]:
    """Two espeak-ng sentences with silence around them, at espeak's rate; the truth is
    where their sound (|x| > 0.01) starts and ends."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no speech to test on")
    d = tmp_path_factory.mktemp("speech")
    clips = []
    for i, text in enumerate(["The quick brown fox jumps over the lazy dog.",
                              "Edge gateways run inference close to the sensors."]):
        subprocess.run(["espeak-ng", "-w", str(d / f"{i}.wav"), text], check=True)
        x, rate = sf.read(d / f"{i}.wav", dtype="float32")
        loud = np.flatnonzero(np.abs(x) > 0.01)
        clips.append(x[loud[0] : loud[-1] + 1])
    gaps = [1.0, 1.5, 1.0]
    parts, truth, at = [], [], 0.0
    for gap, clip in zip(gaps, [*clips, None], strict=True):
        parts.append(np.zeros(int(gap * rate), np.float32))
        at += int(gap * rate) / rate
        if clip is not None:
            parts.append(clip)
            truth.append((at, at + clip.size / rate))
            at += clip.size / rate
    return np.concatenate(parts), rate, truth


def _wav(x: np.ndarray, rate: int, fmt: str = "WAV", **kw: Any) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, **kw)
    return buf.getvalue()


# One 512-sample window (32 ms) of latency either way, the 30 ms padding, and the tail of
# the speech's decay below the 0.01 "sound" level.
SEGMENT_TOL_S = 512 / SAMPLE_RATE + 0.030 + 0.05


def test_vad_finds_the_spoken_sentences(vad: Session, spoken: Any) -> None:
    x, rate, truth = spoken
    pipe = build_pipeline("voice-activity-detection", {}, None, vad)
    assert [s.name for s in pipe.inputs()] == ["audio"]
    segments = pipe.run(vad, {"audio": _bytes(_wav(x, rate))})["segments"]
    assert segments.dtype == np.float32 and segments.shape == (2, 2)
    np.testing.assert_allclose(segments, truth, atol=SEGMENT_TOL_S)


def test_vad_same_answer_from_flac_ogg_stereo_and_48k(vad: Session, spoken: Any) -> None:
    x, rate, truth = spoken
    pipe = build_pipeline("voice-activity-detection", {}, None, vad)
    x48 = resample(x, rate, 48000)
    files = {
        "flac": _wav(x, rate, "FLAC"),
        "ogg": _wav(x, rate, "OGG", subtype="VORBIS"),
        "stereo 48k wav": _wav(np.stack([x48, 0.5 * x48], axis=1), 48000),
    }
    for name, data in files.items():
        segments = pipe.run(vad, {"audio": _bytes(data)})["segments"]
        assert segments.shape == (2, 2), name
        np.testing.assert_allclose(segments, truth, atol=SEGMENT_TOL_S, err_msg=name)


@pytest.mark.parametrize(("variant", "backend"), [
    ("silero_vad_op18_ifless.onnx", OPENVINO), ("silero_vad_op18_ifless.onnx", ORT_CPU),
    ("silero_vad_openvino_16k.onnx", OPENVINO),  # no `sr` input: 16 kHz only
], ids=["ifless-openvino", "ifless-onnxruntime", "openvino16k-openvino"])
def test_vad_other_exports_and_openvino(vad: Session, spoken: Any, variant: str, backend: Any) -> None:
    """silero_vad.onnx's `If` on the sample rate stops OpenVINO; the wheel's If-less exports
    run there and give the same segments as the reference export on ONNX Runtime."""
    x, rate, _ = spoken
    data = _bytes(_wav(x, rate))
    want = build_pipeline("voice-activity-detection", {}, None, vad).run(vad, {"audio": data})
    session = backend.load(silero_vad_path().parent / variant, "CPU", OPTS)
    got = build_pipeline("voice-activity-detection", {}, None, session).run(session, {"audio": data})
    np.testing.assert_allclose(got["segments"], want["segments"], atol=512 / SAMPLE_RATE)


def test_vad_silence_and_settings(vad: Session, spoken: Any) -> None:
    x, rate, _ = spoken
    pipe = build_pipeline("voice-activity-detection", {}, None, vad)
    silence = pipe.run(vad, {"audio": _bytes(_wav(np.zeros(rate, np.float32), rate))})
    assert silence["segments"].shape == (0, 2)
    # A minimum silence longer than the gap between the sentences joins them.
    joined = build_pipeline("voice-activity-detection", {"min_silence_duration_ms": 2000}, None, vad)
    assert joined.run(vad, {"audio": _bytes(_wav(x, rate))})["segments"].shape == (1, 2)


def test_malformed_audio_is_refused_and_the_next_call_works(vad: Session) -> None:
    pipe = build_pipeline("voice-activity-detection", {}, None, vad)
    tone = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    good = _wav(tone, 16000)
    bad = {
        "not audio": (b"this is not audio at all", "not a readable WAV, FLAC, OGG file"),
        "a PNG": (_png(np.zeros((4, 4))), "not a readable WAV, FLAC, OGG file"),
        "empty": (b"", r"input audio\[0\] is empty"),
        "no samples": (_wav(np.zeros(0, np.float32), 16000), "holds no audio samples"),
        "header only": (good[:30], "not a readable"),
    }
    for name, (data, reason) in bad.items():
        with pytest.raises(ValueError, match=reason):
            pipe.run(vad, {"audio": _bytes(data)})
        assert pipe.run(vad, {"audio": _bytes(good)})["segments"].shape[1] == 2, name
    with pytest.raises(ValueError, match="must hold one file, got 2"):
        pipe.run(vad, {"audio": _bytes(good, good)})
    limited = build_pipeline("voice-activity-detection", {"max_seconds": 0.25}, None, vad)
    with pytest.raises(ValueError, match=r"0.5 s of audio is over the limit of 0.25 s"):
        limited.run(vad, {"audio": _bytes(good)})
    flac_only = build_pipeline("voice-activity-detection", {"formats": ["FLAC"]}, None, vad)
    with pytest.raises(ValueError, match="WAV audio is not accepted; send FLAC"):
        flac_only.run(vad, {"audio": _bytes(good)})


def test_vad_needs_a_silero_model(model_dir: Path) -> None:
    session = ORT_CPU.load(build_mlp(model_dir), "CPU", OPTS)
    with pytest.raises(ValueError, match="needs a Silero VAD v5 model"):
        build_pipeline("voice-activity-detection", {}, None, session)


# --- embedding --------------------------------------------------------------------------


def _numpy_embedding(enc: EncoderModel, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    m = np.ones(ids.shape, np.float32) if mask is None else mask.astype(np.float32)
    hidden = np.tanh(enc.embeddings[ids] @ enc.weight + m[..., None] * enc.mask_bias)
    pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    out: np.ndarray = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("backend", [ORT_CPU, OPENVINO], ids=["onnxruntime", "openvino"])
def test_embedding_matches_numpy(model_dir: Path, backend: Any) -> None:
    enc = build_encoder(model_dir)
    session = backend.load(enc.path, "CPU", OPTS)
    pipe = build_pipeline("embedding", {}, None, session)
    assert [s.name for s in pipe.inputs()] == ["input_ids", "attention_mask"]
    assert pipe.outputs() == [TensorSpec("embedding", "FP32", (-1, 16))]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (4, 7)).astype(np.int64)
    mask = np.ones((4, 7), np.int64)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = 0  # padding token
    got = pipe.run(session, {"input_ids": ids, "attention_mask": mask})["embedding"]
    assert got.shape == (4, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, _numpy_embedding(enc, ids, mask), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    # Padding does not change a sequence's vector.
    short = pipe.run(session, {"input_ids": ids[1:2, :4], "attention_mask": mask[1:2, :4]})
    np.testing.assert_allclose(short["embedding"][0], got[1], rtol=RTOL, atol=ATOL)


def test_embedding_without_mask_cls_and_unnormalised(model_dir: Path) -> None:
    enc = build_encoder(model_dir, "encoder_nomask.onnx", with_mask=False)
    session = ORT_CPU.load(enc.path, "CPU", OPTS)
    ids = np.random.default_rng(1).integers(0, 100, (3, 5)).astype(np.int64)
    got = build_pipeline("embedding", {}, None, session).run(session, {"input_ids": ids})
    np.testing.assert_allclose(got["embedding"], _numpy_embedding(enc, ids, None), rtol=RTOL, atol=ATOL)
    hidden = np.tanh(enc.embeddings[ids] @ enc.weight)
    cls = build_pipeline("embedding", {"pooling": "cls", "normalize": False}, None, session)
    np.testing.assert_allclose(cls.run(session, {"input_ids": ids})["embedding"], hidden[:, 0],
                               rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="no output 'pooled'; it has last_hidden_state"):
        build_pipeline("embedding", {"output": "pooled"}, None, session)
