"""Task pipelines on real runtimes, without an agent: the task registry, the tensor task,
and image classification with images through pillow (layout, colour, scale, crop, labels,
JPEG/WebP/PNG, ONNX Runtime against OpenVINO); malformed and oversized images."""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.models import DigitsModel, build_digits, build_digits_float, build_mlp
from edgeinfer.runtimes.base import LoadOptions, TensorSpec
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import KNOWN_TASKS, build_pipeline, pipeline_requirements
from tests.helpers import blobs, to_png

OPTS = LoadOptions(threads=1)
# ORT and OpenVINO (CPU held to f32) differ only by summation order: as in test_runtimes.
RTOL, ATOL = 1e-4, 1e-5
# The digits' 0..16 pixels are stored as round(v * 255 / 16) in the PNGs and scaled back.
DIGITS_SETTINGS: dict[str, Any] = {"color": "L", "size": [8, 8], "scale": 16 / 255, "top_k": 3}


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _digit_pngs(x: np.ndarray) -> list[bytes]:
    return [to_png(np.rint(row.reshape(8, 8) * 255 / 16)) for row in x]


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
    out = pipe.run(session, {"image": blobs(*_digit_pngs(digits.x_test))})
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
    out = pipe.run(session, {"image": blobs(*_digit_pngs(digits_float.x_test))})
    acc = (out["classes"][:, 0] == digits_float.y_test).mean()
    assert acc == (digits_float.sklearn_pred == digits_float.y_test).mean()


def test_digits_float_ort_and_openvino_agree(digits_float: DigitsModel) -> None:
    pngs = blobs(*_digit_pngs(digits_float.x_test))
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
    png = to_png(rgb, "RGB")

    nchw = _image_session((-1, 3, 2, 4))
    build_pipeline("image-classification", {"scale": 1.0}, None, nchw).run(nchw, {"image": blobs(png)})
    x = nchw.seen[0]["pixels"]
    assert x.shape == (1, 3, 2, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], rgb.transpose(2, 0, 1))

    nhwc = _image_session((-1, 2, 4, 3))
    settings = {"scale": 1.0, "color": "BGR", "mean": [1, 2, 3], "std": [2, 2, 2]}
    build_pipeline("image-classification", settings, None, nhwc).run(nhwc, {"image": blobs(png)})
    want = (rgb[:, :, ::-1].astype(np.float32) - [1, 2, 3]) / 2
    np.testing.assert_array_equal(nhwc.seen[0]["pixels"][0], want)

    # Centre crop: a 2x2 model input takes the middle two columns of the 4x2 image.
    crop = _image_session((-1, 3, 2, 2))
    settings = {"scale": 1.0, "interpolation": "nearest"}
    build_pipeline("image-classification", settings, None, crop).run(crop, {"image": blobs(png)})
    np.testing.assert_array_equal(crop.seen[0]["pixels"][0], rgb[:, 1:3].transpose(2, 0, 1))

    # Stretch: all four columns squeezed into two (nearest takes columns 0 and 2 or 1 and 3).
    stretch = _image_session((-1, 3, 2, 2))
    build_pipeline("image-classification", {**settings, "resize": "stretch"}, None, stretch).run(
        stretch, {"image": blobs(png)})
    assert set(stretch.seen[0]["pixels"][0, 0, 0]) <= {0, 10, 20, 30}
    assert stretch.seen[0]["pixels"][0, 0, 0, 0] < stretch.seen[0]["pixels"][0, 0, 0, 1]


def test_crop_ratio_like_torchvision_resize_then_center_crop() -> None:
    """crop_ratio 0.5 on a 8x8 image into 2x2: resize to 4x4, keep the middle 2x2."""
    img = np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10, np.ones((2, 2), np.uint8))
    session = _image_session((-1, 1, 2, 2))
    settings = {"color": "L", "scale": 1.0, "crop_ratio": 0.5, "interpolation": "nearest"}
    build_pipeline("image-classification", settings, None, session).run(
        session, {"image": blobs(to_png(img))})
    np.testing.assert_array_equal(session.seen[0]["pixels"][0, 0], [[50, 60], [90, 100]])


def test_jpeg_webp_and_uint8_models() -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8), "RGB")
    session = _image_session((1, 16, 16, 3), datatype="UINT8")  # fixed batch of 1: one call each
    pipe = build_pipeline("image-classification", {"scale": 1.0}, None, session)
    images = blobs(_encode(photo, "JPEG", quality=90), _encode(photo, "WEBP"), _encode(photo, "PNG"))
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
    png = to_png(np.zeros((4, 4)))
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n\nfish\n")
    out = build_pipeline("image-classification", {"color": "L", "top_k": 2, "softmax": True},
                         tmp_path, session).run(session, {"image": blobs(png)})
    assert out["labels"].tolist() == [[b"dog", b"bird"]]
    assert out["classes"].tolist() == [[1, 2]]
    z = np.exp(logits - logits.max())
    np.testing.assert_allclose(out["scores"], [(z / z.sum())[0, [1, 2]]], rtol=1e-6)

    out = build_pipeline("image-classification", {"color": "L", "labels": ["a", "b", "c", "d"],
                                                   "top_k": 10}, None, session).run(
        session, {"image": blobs(png)})
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
            pipe.run(session, {"image": blobs(data)})
        out = pipe.run(session, {"image": blobs(good)})
        assert out["classes"][0, 0] == digits_float.sklearn_pred[0], name
    with pytest.raises(ValueError, match=r"image\[1\] must hold the bytes"):
        pipe.run(session, {"image": np.array([good, 3], dtype=object)})
    with pytest.raises(ValueError, match="missing input 'image'"):
        pipe.run(session, {"x": blobs(good)})


def test_huge_image_refused_before_decoding() -> None:
    session = _image_session((-1, 1, 8, 8))
    pipe = build_pipeline("image-classification", {"color": "L", "max_pixels": 1000}, None, session)
    with pytest.raises(ValueError, match="image of 100x100 pixels is over the limit of 1000"):
        pipe.run(session, {"image": blobs(to_png(np.zeros((100, 100))))})

