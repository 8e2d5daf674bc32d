"""The `ocr` pipeline on PaddleOCR's models from the rapidocr-onnxruntime wheel, against that
wheel's own RapidOCR pipeline, on ONNX Runtime and OpenVINO."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from edgeinfer.runtimes.base import LoadOptions, Session
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import MULTI_MODEL_TASKS, build_pipeline, pipeline_requirements

cv2 = pytest.importorskip("cv2", reason="opencv missing: pip install 'edgeinfer[ocr]'")

from edgeinfer.runtimes.pipelines.ocr import warmup_inputs  # noqa: E402
from edgeinfer.runtimes.pipelines.ocr_geometry import unclip  # noqa: E402
from edgeinfer.runtimes.pipelines.ocr_settings import onnx_metadata  # noqa: E402

OPTS = LoadOptions()
FONT_FILE = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
BOX_TOLERANCE_PX = 2.0  # vs RapidOCR; seen: 0
RUNTIME_BOX_TOLERANCE_PX = 2.0  # OpenVINO vs ONNX Runtime; seen: 0


def _load(backend: Any, ocr_models: Path,
          roles: tuple[str, ...] = ("det", "rec", "cls")) -> dict[str, Session]:
    return {r: backend.load(ocr_models / f"{r}.onnx", "CPU", OPTS) for r in roles}


@pytest.fixture(scope="module")
def ort_sessions(ocr_models: Path) -> Iterator[dict[str, Session]]:
    sessions = _load(ORT_CPU, ocr_models)
    yield sessions
    for s in sessions.values():
        s.close()


@dataclass(frozen=True)
class Rendered:
    name: str
    data: bytes
    lines: list[str]  # in reading order (of the page as it is, upside down or not)
    where: list[tuple[int, int, int, int]]  # ink box of each line (left, top, right, bottom)


def _font(size: int) -> ImageFont.FreeTypeFont:
    if not FONT_FILE.is_file():
        pytest.skip(f"{FONT_FILE} missing (apt-get install fonts-dejavu-core)")
    return ImageFont.truetype(str(FONT_FILE), size)


def _render(name: str, size: tuple[int, int], lines: list[tuple[tuple[int, int], str, int]],
            mode: str = "RGB", fmt: str = "PNG", upside_down: bool = False) -> Rendered:
    im = Image.new(mode, size, "white")
    draw = ImageDraw.Draw(im)
    where = []
    for (x, y), text, pt in lines:
        font = _font(pt)
        draw.text((x, y), text, fill="black", font=font)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        where.append((int(left), int(top), int(right), int(bottom)))
    if upside_down:
        im = im.rotate(180)
        w, h = size
        where = [(w - r, h - b, w - left, h - t) for left, t, r, b in where][::-1]
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    texts = [t for _, t, _ in lines]
    return Rendered(name, buf.getvalue(), texts[::-1] if upside_down else texts, where)


@pytest.fixture(scope="module")
def images() -> list[Rendered]:
    return [
        _render("three lines", (640, 300), [((20, 20), "Hello edge gateway", 28),
                                            ((20, 80), "Invoice 2024-05-17", 28),
                                            ((300, 160), "Total: 42.50 EUR", 28)]),
        _render("grey, two sizes", (800, 400), [((40, 40), "Temperature 21.5 C", 36),
                                                ((400, 300), "pump OK", 22)], mode="L"),
        _render("one wide line", (900, 40), [((10, 5), "SERIAL NUMBER AB12-345", 24)]),
        _render("jpeg", (500, 200), [((30, 60), "Quality check passed", 30)], fmt="JPEG"),
        _render("upside down", (600, 200), [((40, 40), "Rotated label 7", 32),
                                            ((40, 110), "Second line here", 32)], upside_down=True),
    ]


def _run(pipe: Any, sessions: Any, data: bytes) -> dict[str, np.ndarray]:
    return dict(pipe.run(sessions, {"image": np.array([data], dtype=object)}))


def _texts(out: dict[str, np.ndarray]) -> list[str]:
    return [t.decode() for t in out["texts"]]


@pytest.fixture(scope="module")
def ort_answers(ocr_models: Path, ort_sessions: dict[str, Session],
                images: list[Rendered]) -> list[dict[str, np.ndarray]]:
    pipe = build_pipeline("ocr", {}, ocr_models, ort_sessions)
    return [_run(pipe, ort_sessions, img.data) for img in images]


# The reference pipeline and what it imports besides opencv: the dev group's optional
# packages (rapidocr-onnxruntime has no wheel for Python 3.13 and later).
REFERENCE_PACKAGES = ("rapidocr_onnxruntime", "pyclipper", "shapely")


def _reference() -> Any:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ModuleNotFoundError as exc:
        # Only a missing optional package skips; any other failure of the import is a failure.
        if (exc.name or "").split(".")[0] not in REFERENCE_PACKAGES:
            raise
        pytest.skip(f"rapidocr-onnxruntime's reference pipeline needs {exc.name}, which is not "
                    "installed (scripts/bootstrap.sh installs the dev group)")
    return RapidOCR()


# --- against RapidOCR ------------------------------------------------------------------


def test_same_texts_and_boxes_as_rapidocr(images: list[Rendered],
                                          ort_answers: list[dict[str, np.ndarray]]) -> None:
    reference = _reference()
    for img, out in zip(images, ort_answers, strict=True):
        ref, _ = reference(img.data)
        assert ref, img.name
        assert _texts(out) == [r[1] for r in ref], img.name
        ref_boxes = np.array([r[0] for r in ref], dtype=np.float32)
        assert out["boxes"].shape == ref_boxes.shape
        assert np.abs(out["boxes"] - ref_boxes).max() <= BOX_TOLERANCE_PX, img.name
        np.testing.assert_allclose(out["scores"], [r[2] for r in ref], atol=1e-4)


def test_reads_the_rendered_lines_where_they_are(images: list[Rendered],
                                                 ort_answers: list[dict[str, np.ndarray]]) -> None:
    for img, out in zip(images, ort_answers, strict=True):
        # PP-OCRv4's Chinese/English model drops most spaces between Latin words.
        assert [t.replace(" ", "") for t in _texts(out)] == [t.replace(" ", "") for t in img.lines], img.name
        assert out["boxes"].dtype == np.float32 and out["boxes"].shape == (len(img.lines), 4, 2)
        assert out["scores"].dtype == np.float32 and (out["scores"] >= 0.5).all()
        for box, (left, top, right, bottom) in zip(out["boxes"], img.where, strict=True):
            # the box covers pillow's text box (to 5 pixels: that box includes side bearings),
            # with at most a line's height of margin
            margin = bottom - top
            assert box[:, 0].min() <= left + 5 and box[:, 0].max() >= right - 5, img.name
            assert box[:, 1].min() <= top + 5 and box[:, 1].max() >= bottom - 5, img.name
            assert box[:, 0].min() >= left - margin and box[:, 0].max() <= right + margin, img.name
            assert box[:, 1].min() >= top - margin and box[:, 1].max() <= bottom + margin, img.name


def test_openvino_reads_the_same(ocr_models: Path, images: list[Rendered],
                                 ort_answers: list[dict[str, np.ndarray]]) -> None:
    sessions = _load(OPENVINO, ocr_models)
    pipe = build_pipeline("ocr", {}, ocr_models, sessions)
    for img, want in zip(images, ort_answers, strict=True):
        out = _run(pipe, sessions, img.data)
        assert _texts(out) == _texts(want), img.name
        assert np.abs(out["boxes"] - want["boxes"]).max() <= RUNTIME_BOX_TOLERANCE_PX, img.name
        np.testing.assert_allclose(out["scores"], want["scores"], atol=1e-3)


def test_without_cls_upright_text_reads_the_same(ocr_models: Path, ort_sessions: dict[str, Session],
                                                 images: list[Rendered],
                                                 ort_answers: list[dict[str, np.ndarray]]) -> None:
    sessions = {r: ort_sessions[r] for r in ("det", "rec")}
    pipe = build_pipeline("ocr", {}, ocr_models, sessions)
    off = build_pipeline("ocr", {"use_cls": False}, ocr_models, ort_sessions)
    assert _texts(_run(pipe, sessions, images[0].data)) == _texts(ort_answers[0])
    assert _texts(_run(off, ort_sessions, images[1].data)) == _texts(ort_answers[1])


# --- pieces ----------------------------------------------------------------------------


def test_unclip_matches_pyclipper() -> None:
    pyclipper = pytest.importorskip("pyclipper", reason="pyclipper (dev extra) not installed")
    rng = np.random.default_rng(0)
    for _ in range(2000):
        cx, cy = rng.uniform(0, 800, 2)
        w, h = rng.uniform(3, 300, 2)
        angle = float(rng.choice([0.0, 90.0, rng.uniform(-90, 90)]))
        box = cv2.boxPoints(((cx, cy), (w, h), angle)).astype(np.float32)
        x, y = box[:, 0].astype(np.float64), box[:, 1].astype(np.float64)
        area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
        length = float(np.hypot(np.roll(x, -1) - x, np.roll(y, -1) - y).sum())
        offset = pyclipper.PyclipperOffset()
        offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        want = np.array(offset.Execute(area * 1.6 / length)).reshape(-1, 2).astype(np.int32)
        got = unclip(box, 1.6)
        hull = {tuple(p) for p in cv2.convexHull(got).reshape(-1, 2).tolist()}
        assert hull == {tuple(p) for p in cv2.convexHull(want).reshape(-1, 2).tolist()}


def test_characters_from_onnx_metadata(ocr_models: Path) -> None:
    import onnxruntime as ort

    meta = ort.InferenceSession(str(ocr_models / "rec.onnx")).get_modelmeta().custom_metadata_map
    assert onnx_metadata(ocr_models / "rec.onnx") == dict(meta)
    assert onnx_metadata(ocr_models / "det.onnx") == {}


def test_characters_file_and_mismatch(tmp_path: Path, ocr_models: Path,
                                      ort_sessions: dict[str, Session]) -> None:
    chars = onnx_metadata(ocr_models / "rec.onnx")["character"].splitlines()
    (tmp_path / "characters.txt").write_text("\n".join(chars) + "\n", encoding="utf-8")
    build_pipeline("ocr", {}, tmp_path, ort_sessions)  # the file, not rec.onnx (absent here)
    with pytest.raises(ValueError, match=r"the rec model has 6625 classes; 3 characters give 5"):
        build_pipeline("ocr", {"characters": ["a", "b", "c"]}, None, ort_sessions)
    with pytest.raises(ValueError, match=r"no characters: neither characters\.txt nor a readable rec\.onnx"):
        build_pipeline("ocr", {}, tmp_path / "nowhere", ort_sessions)
    with pytest.raises(ValueError, match="must be a plain file name"):
        build_pipeline("ocr", {"characters_file": "../x.txt"}, ocr_models, ort_sessions)


def test_roles_are_checked(ocr_models: Path, ort_sessions: dict[str, Session]) -> None:
    assert MULTI_MODEL_TASKS["ocr"] == (("det", "rec"), ("cls",))
    with pytest.raises(ValueError, match="ocr runs several models: give a mapping of role -> session"):
        build_pipeline("ocr", {}, ocr_models, ort_sessions["det"])
    with pytest.raises(ValueError, match=r"missing model\(s\) rec; unknown role\(s\) layout"):
        build_pipeline("ocr", {}, ocr_models, {"det": ort_sessions["det"], "layout": ort_sessions["cls"]})
    with pytest.raises(ValueError, match="the rec model has 2 classes; 6623 characters give 6625"):
        build_pipeline("ocr", {}, ocr_models, {"det": ort_sessions["det"], "rec": ort_sessions["cls"]})
    with pytest.raises(ValueError, match=r"key 'thresh': unknown key \(known keys: max_side_len"):
        build_pipeline("ocr", {"thresh": 0.2}, ocr_models, ort_sessions)


def test_warmup_inputs_run(ort_sessions: dict[str, Session]) -> None:
    for role, session in ort_sessions.items():
        out = session.infer(warmup_inputs(role))
        assert all(np.isfinite(v).all() for v in out.values())


def test_requirements_name_opencv(monkeypatch: pytest.MonkeyPatch, ocr_models: Path,
                                  ort_sessions: dict[str, Session]) -> None:
    assert pipeline_requirements()["ocr"] is None
    monkeypatch.setitem(sys.modules, "cv2", None)
    req = pipeline_requirements()["ocr"]
    assert req is not None and req.startswith("opencv unavailable: ModuleNotFoundError")
    assert req.endswith("(pip install 'edgeinfer[ocr]')")
    with pytest.raises(ValueError, match="task ocr cannot run here: opencv unavailable"):
        build_pipeline("ocr", {}, ocr_models, ort_sessions)


# --- bad input -------------------------------------------------------------------------


def test_malformed_images_are_refused_and_the_next_call_works(
        ocr_models: Path, ort_sessions: dict[str, Session], images: list[Rendered]) -> None:
    pipe: Any = build_pipeline("ocr", {}, ocr_models, ort_sessions)  # run takes the mapping
    good = images[0].data
    bad: list[tuple[Any, str]] = [
        (np.array([good[: len(good) // 2]], dtype=object),
         r"input image\[0\]: could not decode the PNG image"),
        (np.array([b"not an image at all"], dtype=object), r"input image\[0\]: not a JPEG, PNG, WEBP image"),
        (np.array([b""], dtype=object), r"input image\[0\] is empty"),
        (np.array([good, good], dtype=object), "input image must hold one image, got 2"),
        (np.array(["text"], dtype=object), r"input image\[0\] must hold the bytes of an encoded file"),
    ]
    for arr, message in bad:
        with pytest.raises(ValueError, match=message):
            pipe.run(ort_sessions, {"image": arr})
    with pytest.raises(ValueError, match="missing input 'image'"):
        pipe.run(ort_sessions, {})
    tiny: Any = build_pipeline("ocr", {"max_pixels": 1000}, ocr_models, ort_sessions)
    with pytest.raises(ValueError, match="image of 640x300 pixels is over the limit of 1000"):
        tiny.run(ort_sessions, {"image": np.array([good], dtype=object)})
    assert _texts(_run(pipe, ort_sessions, good)) == [t.replace(" ", "") for t in images[0].lines]


def test_blank_and_tiny_images_give_empty_answers(ocr_models: Path, ort_sessions: dict[str, Session]) -> None:
    pipe = build_pipeline("ocr", {}, ocr_models, ort_sessions)
    for size in ((320, 240), (1, 1)):
        buf = io.BytesIO()
        Image.new("RGB", size, "white").save(buf, "PNG")
        out = _run(pipe, ort_sessions, buf.getvalue())
        assert out["boxes"].shape == (0, 4, 2) and out["boxes"].dtype == np.float32
        assert out["texts"].shape == (0,) and out["scores"].shape == (0,)
    buf = io.BytesIO()
    Image.new("RGB", (3000, 20), "white").save(buf, "PNG")  # 2000 wide: 13 rows, rounded to 0
    with pytest.raises(ValueError, match="an image of 3000x20 pixels is too thin to read"):
        _run(pipe, ort_sessions, buf.getvalue())
