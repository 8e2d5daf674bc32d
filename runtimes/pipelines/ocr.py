"""The `ocr` task: one encoded image in; text lines, their boxes and scores out.

A multi-model pipeline on PaddleOCR's ONNX models (the ones the rapidocr-onnxruntime wheel
ships): `det` finds text regions (DB segmentation), the optional `cls` says whether a line
is upside down, `rec` reads each line (CTC). The pipeline is built on a mapping of role ->
Session (`MODEL_ROLES`): the models of one version deploy, version and roll back together.

Per image, as RapidOCR 1.4 does it (same defaults, so the same texts and boxes): decode
(pillow) to BGR; shrink so the longer side is at most `max_side_len`, grow so the shorter
is at least `min_side_len`; pad top and bottom when the image is short or very wide; resize
for `det` so the shorter side is `det_limit_side_len` (both sides multiples of 32);
threshold and dilate the probability map, take each contour's minimum-area rectangle, keep
it if its mean probability reaches `box_thresh`, grow it by area * `unclip_ratio` /
perimeter on every side; sort top to bottom, left to right; cut each box out upright
(perspective warp), classify (`cls`: turn by 180 degrees above `cls_thresh`), recognise
(`rec`, in batches of lines of similar aspect ratio), keep lines scoring `text_score` or
more, and map the boxes back to the original image's pixel coordinates.

The box growing is done on the rectangle itself (it is what pyclipper's rounded offset
gives once its minimum-area rectangle is taken), so that opencv is the only extra library.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import cv2
import msgspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgeinfer.contract.tasks import MULTI_MODEL_TASKS
from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.pipelines.base import Pipeline, media_items, parse_settings, require, sniff_image

TASK = "ocr"
IMAGE_INPUT = "image"
# Roles of the models one `ocr` version is made of: (required, optional).
MODEL_ROLES: tuple[tuple[str, ...], tuple[str, ...]] = MULTI_MODEL_TASKS[TASK]
DEFAULT_CHARACTERS_FILE = "characters.txt"
DEFAULT_REC_MODEL_FILE = "rec.onnx"
CHARACTER_METADATA_KEY = "character"  # where PaddleOCR's exports keep the character list

Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]
Side = Annotated[int, msgspec.Meta(ge=1)]


class OcrSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # image as a whole
    max_side_len: Side = 2000
    min_side_len: Side = 30
    min_height: Side = 30  # images this short (or wider than width_height_ratio) are padded
    width_height_ratio: float = 8.0  # -1: never pad for width
    # detection
    det_limit_side_len: Side = 736
    det_limit_type: Literal["min", "max"] = "min"
    det_thresh: Unit = 0.3
    box_thresh: Unit = 0.5
    max_candidates: Side = 1000
    unclip_ratio: Annotated[float, msgspec.Meta(ge=0)] = 1.6
    use_dilation: bool = True
    score_mode: Literal["fast", "slow"] = "fast"
    # direction classifier (only when a cls model is given)
    use_cls: bool = True
    cls_thresh: Unit = 0.9
    cls_image_shape: tuple[Side, Side, Side] = (3, 48, 192)
    cls_batch_num: Side = 6
    cls_labels: tuple[str, ...] = ("0", "180")
    # recognition
    rec_image_shape: tuple[Side, Side, Side] = (3, 48, 320)
    rec_batch_num: Side = 6
    text_score: Unit = 0.5
    characters: tuple[str, ...] | None = None
    characters_file: str | None = None  # default characters.txt, if the model folder has it
    rec_model_file: str = DEFAULT_REC_MODEL_FILE  # else: its ONNX metadata "character"
    # decoding
    formats: tuple[Literal["JPEG", "PNG", "WEBP", "BMP", "TIFF"], ...] = ("JPEG", "PNG", "WEBP")
    max_pixels: Side = 40_000_000
    exif_transpose: bool = True


# --- the character list -------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of one protobuf message's top-level fields."""
    out: list[tuple[int, int, bytes | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props (ModelProto field 14), read without onnx or a runtime."""
    props: dict[str, str] = {}
    for number, wire, value in _fields(path.read_bytes()):
        if number == 14 and wire == 2 and isinstance(value, bytes):
            entry = {n: v for n, w, v in _fields(value) if w == 2 and isinstance(v, bytes)}
            props[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    return props


def _inside(model_dir: Path | None, name: str, key: str) -> Path:
    rel = Path(name)
    if model_dir is None or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(
            f"{TASK} settings: {key} {name!r} must be a plain file name inside the model's folder"
        )
    return model_dir / rel


def load_characters(cfg: OcrSettings, model_dir: Path | None) -> list[str]:
    """The recogniser's characters, in class order, blank and trailing space not included.

    From `characters`, else `characters_file` (default characters.txt when present), else
    the "character" metadata of the rec model's ONNX file, as PaddleOCR exports carry it.
    """
    if cfg.characters is not None:
        if cfg.characters_file is not None:
            raise ValueError(f"{TASK} settings: give characters or characters_file, not both")
        return list(cfg.characters)
    if cfg.characters_file is not None:
        path = _inside(model_dir, cfg.characters_file, "characters_file")
    elif model_dir is not None and (model_dir / DEFAULT_CHARACTERS_FILE).is_file():
        path = model_dir / DEFAULT_CHARACTERS_FILE
    else:
        onnx_path = _inside(model_dir, cfg.rec_model_file, "rec_model_file")
        try:
            meta = onnx_metadata(onnx_path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{TASK}: no characters: neither {DEFAULT_CHARACTERS_FILE} nor a readable "
                f"{onnx_path.name} in the model folder ({exc})"
            ) from None
        if CHARACTER_METADATA_KEY not in meta:
            raise ValueError(
                f"{TASK}: {onnx_path.name} has no {CHARACTER_METADATA_KEY!r} metadata; give the "
                f"characters in {DEFAULT_CHARACTERS_FILE} (one per line) or the setting characters"
            )
        return meta[CHARACTER_METADATA_KEY].splitlines()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{TASK}: cannot read characters file {path.name}: {exc}") from None
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline ending the last line
    return [line.removesuffix("\r") for line in lines]


# --- geometry -----------------------------------------------------------------------------


def _mini_box(contour: np.ndarray) -> tuple[np.ndarray, float]:
    """The minimum-area rectangle's corners (top-left, top-right, bottom-right, bottom-left
    as PaddleOCR orders them) and its shorter side."""
    rect = cv2.minAreaRect(contour)
    pts = sorted(cv2.boxPoints(rect), key=lambda p: p[0])
    i1, i4 = (0, 1) if pts[1][1] > pts[0][1] else (1, 0)
    i2, i3 = (2, 3) if pts[3][1] > pts[2][1] else (3, 2)
    return np.array([pts[i1], pts[i2], pts[i3], pts[i4]]), float(min(rect[1]))


def _box_score(pred: np.ndarray, box: np.ndarray) -> float:
    """Mean probability inside the polygon (`box` [k, 2] in map pixels)."""
    h, w = pred.shape
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    shifted = box - np.array([xmin, ymin], dtype=box.dtype)
    cv2.fillPoly(mask, shifted.reshape(1, -1, 2).astype(np.int32), 1)
    return float(cv2.mean(pred[ymin : ymax + 1, xmin : xmax + 1], mask)[0])


def _round(v: float) -> int:
    """Half away from zero, as Clipper rounds."""
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def _unclip(box: np.ndarray, ratio: float, arc_tolerance: float = 0.25) -> np.ndarray:
    """The polygon grown by area * ratio / perimeter, with rounded corners: the points
    pyclipper's PyclipperOffset (JT_ROUND, closed polygon) gives, as PaddleOCR's DB
    post-processing uses it (same integer corners, arc steps and rounding; the tests check
    the convex hulls are equal), without pyclipper and shapely."""
    x, y = box[:, 0].astype(np.float64), box[:, 1].astype(np.float64)
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    perimeter = float(np.hypot(np.roll(x, -1) - x, np.roll(y, -1) - y).sum())
    delta = area * ratio / perimeter if perimeter > 0 else 0.0
    pts: list[tuple[int, int]] = []
    for px, py in box:  # Clipper takes integer points: the float corners are truncated
        p = (int(px), int(py))
        if not pts or pts[-1] != p:
            pts.append(p)
    while len(pts) > 1 and pts[-1] == pts[0]:
        pts.pop()
    if len(pts) < 3 or delta <= 0:
        return np.array(pts, dtype=np.int32)
    n = len(pts)
    # Clipper's orientation: grow outwards whichever way the corners run.
    signed = sum((pts[i - 1][0] + pts[i][0]) * (pts[i - 1][1] - pts[i][1]) for i in range(n))
    if -0.5 * signed < 0:
        pts.reverse()
    tol = arc_tolerance if 0 < arc_tolerance <= delta * 0.25 else delta * 0.25
    steps = min(math.pi / math.acos(1 - tol / delta), delta * math.pi)
    sin_step, cos_step = math.sin(2 * math.pi / steps), math.cos(2 * math.pi / steps)
    steps_per_rad = steps / (2 * math.pi)
    normals = []
    for j in range(n):
        dx, dy = pts[(j + 1) % n][0] - pts[j][0], pts[(j + 1) % n][1] - pts[j][1]
        f = 1.0 / math.hypot(dx, dy)
        normals.append((dy * f, -dx * f))
    out: list[tuple[int, int]] = []

    def at(sx: int, sy: int, nx: float, ny: float) -> tuple[int, int]:
        return _round(sx + nx * delta), _round(sy + ny * delta)

    k = n - 1
    for j in range(n):
        (kx, ky), (jx, jy), (sx, sy) = normals[k], normals[j], pts[j]
        sin_a = kx * jy - jx * ky
        cos_a = kx * jx + ky * jy
        if abs(sin_a * delta) < 1.0 and cos_a > 0:
            out.append(at(sx, sy, kx, ky))
        elif sin_a * delta < 0:
            out += [at(sx, sy, kx, ky), (sx, sy), at(sx, sy, jx, jy)]
        else:
            sin_a = max(-1.0, min(1.0, sin_a))
            count = max(_round(steps_per_rad * abs(math.atan2(sin_a, cos_a))), 1)
            nx, ny = kx, ky
            for _ in range(count):
                out.append(at(sx, sy, nx, ny))
                nx, ny = nx * cos_step - sin_step * ny, nx * sin_step + ny * cos_step
            out.append(at(sx, sy, jx, jy))
        k = j
    return np.array(out, dtype=np.int32)


def _order_clockwise(pts: np.ndarray) -> np.ndarray:
    by_x = pts[np.argsort(pts[:, 0]), :]
    left, right = by_x[:2, :], by_x[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def _sorted_boxes(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Top to bottom; boxes whose tops are within 10 pixels, left to right."""
    out = sorted(boxes, key=lambda b: (b[0][1], b[0][0]))
    for i in range(len(out) - 1):
        for j in range(i, -1, -1):
            if abs(out[j + 1][0][1] - out[j][0][1]) < 10 and out[j + 1][0][0] < out[j][0][0]:
                out[j], out[j + 1] = out[j + 1], out[j]
            else:
                break
    return out


def _crop(img: np.ndarray, points: np.ndarray) -> np.ndarray:
    width = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    height = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(points.astype(np.float32), target)
    out = cv2.warpPerspective(img, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE,
                              flags=cv2.INTER_CUBIC)
    if out.shape[0] / out.shape[1] >= 1.5:
        out = np.rot90(out)
    return np.asarray(out)


def _scaled_to_32(img: np.ndarray, ratio: float) -> np.ndarray | None:
    h, w = img.shape[:2]
    new_h = round(int(h * ratio) / 32) * 32
    new_w = round(int(w * ratio) / 32) * 32
    if new_h <= 0 or new_w <= 0:
        return None
    return np.asarray(cv2.resize(img, (new_w, new_h)))


# --- the pipeline -------------------------------------------------------------------------


def _check_model(role: str, session: Session, channels: int, rank: int = 4) -> str:
    if len(session.inputs) != 1:
        raise ValueError(f"{TASK}: the {role} model must take one input, it takes {len(session.inputs)}")
    spec = session.inputs[0]
    shape_ok = not spec.shape or (len(spec.shape) == rank and spec.shape[1] in (-1, channels))
    if spec.datatype != "FP32" or not shape_ok:
        raise ValueError(
            f"{TASK}: the {role} model's input {spec.name} is {spec.datatype} {list(spec.shape)}; "
            f"it must be FP32 [N, {channels}, H, W]"
        )
    if not session.outputs:
        raise ValueError(f"{TASK}: the {role} model has no output")
    return spec.name


class Ocr(Pipeline):
    task = TASK

    def __init__(self, cfg: OcrSettings, characters: list[str], sessions: Mapping[str, Session]) -> None:
        self._cfg = cfg
        # CTC: class 0 is the blank, the last class a space (PaddleOCR's use_space_char).
        self._characters = ["", *characters, " "]
        self._use_cls = cfg.use_cls and "cls" in sessions
        self._names: dict[str, tuple[str, str]] = {}
        for role, channels in (("det", 3), ("rec", cfg.rec_image_shape[0]), ("cls", cfg.cls_image_shape[0])):
            if role in sessions:
                session = sessions[role]
                self._names[role] = (_check_model(role, session, channels), session.outputs[0].name)
        classes = sessions["rec"].outputs[0].shape[-1] if sessions["rec"].outputs[0].shape else -1
        if classes > 0 and classes != len(self._characters):
            raise ValueError(
                f"{TASK}: the rec model has {classes} classes; {len(characters)} characters give "
                f"{len(self._characters)} (with the CTC blank and the space)"
            )

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(IMAGE_INPUT, "BYTES", (1,))]

    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec("boxes", "FP32", (-1, 4, 2)),
            TensorSpec("texts", "BYTES", (-1,)),
            TensorSpec("scores", "FP32", (-1,)),
        ]

    # -- decoding --

    def decode(self, data: bytes, index: int = 0) -> np.ndarray:
        """The image as uint8 BGR [H, W, 3]; transparency is laid over white."""
        cfg = self._cfg
        where = f"input {IMAGE_INPUT}[{index}]"
        try:
            with Image.open(io.BytesIO(data), formats=list(cfg.formats)) as opened:
                if opened.width * opened.height > cfg.max_pixels:
                    raise ValueError(
                        f"{where}: image of {opened.width}x{opened.height} pixels is over the "
                        f"limit of {cfg.max_pixels}"
                    )
                opened.load()
                im = ImageOps.exif_transpose(opened) if cfg.exif_transpose else opened
                if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                    rgba = im.convert("RGBA")
                    im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im.alpha_composite(rgba)
                im = im.convert("RGB")
        except UnidentifiedImageError:
            raise ValueError(
                f"{where}: not a {', '.join(cfg.formats)} image (first bytes {data[:8].hex()})"
            ) from None
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{where}: image too large: {exc}") from None
        except (OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"{where}: could not decode the {sniff_image(data)}: {exc}") from None
        if im.width < 1 or im.height < 1:
            raise ValueError(f"{where}: image of {im.width}x{im.height} pixels holds nothing")
        return np.ascontiguousarray(np.asarray(im)[:, :, ::-1])

    # -- stages --

    def _fit(self, img: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Image within max_side_len / min_side_len; original pixels per resized pixel (y, x)."""
        cfg = self._cfg
        h0, w0 = img.shape[:2]
        if max(h0, w0) > cfg.max_side_len:
            img = self._resized(img, cfg.max_side_len / max(h0, w0), h0, w0)
        if min(img.shape[:2]) < cfg.min_side_len:
            img = self._resized(img, cfg.min_side_len / min(img.shape[:2]), h0, w0)
        return img, h0 / img.shape[0], w0 / img.shape[1]

    @staticmethod
    def _resized(img: np.ndarray, ratio: float, h0: int, w0: int) -> np.ndarray:
        resized = _scaled_to_32(img, ratio)
        if resized is None:
            raise ValueError(
                f"input {IMAGE_INPUT}: an image of {w0}x{h0} pixels is too thin to read "
                "(one side would shrink to nothing)"
            )
        return resized

    def _letterbox(self, img: np.ndarray) -> tuple[np.ndarray, int]:
        cfg = self._cfg
        h, w = img.shape[:2]
        wide = cfg.width_height_ratio != -1 and w / h > cfg.width_height_ratio
        if h > cfg.min_height and not wide:
            return img, 0
        pad = int(abs(max(int(w / cfg.width_height_ratio), cfg.min_height) * 2 - h) / 2)
        return cv2.copyMakeBorder(img, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0)), pad

    def detect(self, session: Session, img: np.ndarray) -> list[np.ndarray]:
        """Text boxes [4, 2] (float32, pixels of `img`), in reading order."""
        cfg = self._cfg
        h, w = img.shape[:2]
        if cfg.det_limit_type == "min":
            ratio = cfg.det_limit_side_len / min(h, w) if min(h, w) < cfg.det_limit_side_len else 1.0
        else:
            ratio = cfg.det_limit_side_len / max(h, w) if max(h, w) > cfg.det_limit_side_len else 1.0
        resized = _scaled_to_32(img, ratio)
        if resized is None:
            return []
        x = ((resized.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        name, out = self._names["det"]
        pred = session.infer({name: np.ascontiguousarray(x, dtype=np.float32)}, [out])[out]
        map_h, map_w = int(pred.shape[-2]), int(pred.shape[-1])
        prob = np.asarray(pred, dtype=np.float32).reshape(map_h, map_w)
        bitmap = np.asarray(prob > cfg.det_thresh, dtype=np.uint8)
        if cfg.use_dilation:
            bitmap = np.asarray(cv2.dilate(bitmap, np.ones((2, 2), np.uint8)), dtype=np.uint8)
        found = cv2.findContours(bitmap * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        contours: Sequence[np.ndarray] = found[-2]  # opencv 3 answers 3 values, later ones 2
        boxes: list[np.ndarray] = []
        for contour in contours[: cfg.max_candidates]:
            points, short = _mini_box(contour)
            if short < 3:
                continue
            if cfg.score_mode == "fast":
                score = _box_score(prob, points.reshape(-1, 2))
            else:
                score = _box_score(prob, contour.reshape(-1, 2).astype(np.float32))
            if score < cfg.box_thresh:
                continue
            box, short = _mini_box(_unclip(points, cfg.unclip_ratio))
            if short < 5:
                continue
            box[:, 0] = np.clip(np.round(box[:, 0] / map_w * w), 0, w)
            box[:, 1] = np.clip(np.round(box[:, 1] / map_h * h), 0, h)
            box = _order_clockwise(box.astype(np.int32).astype(np.float32))
            box[:, 0] = np.clip(box[:, 0], 0, w - 1).astype(np.int32)
            box[:, 1] = np.clip(box[:, 1], 0, h - 1).astype(np.int32)
            if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
                continue
            boxes.append(box)
        return _sorted_boxes(boxes)

    def _norm(self, img: np.ndarray, shape: tuple[int, int, int], width: int) -> np.ndarray:
        c, h, _ = shape
        resized_w = min(width, math.ceil(h * (img.shape[1] / float(img.shape[0]))))
        resized = cv2.resize(img, (resized_w, h)).astype(np.float32)
        if c == 1:
            resized = resized[:, :, None] if resized.ndim == 2 else resized[:, :, :1]
        out = np.zeros((c, h, width), dtype=np.float32)
        out[:, :, :resized_w] = (resized.transpose(2, 0, 1) / 255 - 0.5) / 0.5
        return out

    def classify(self, session: Session, crops: list[np.ndarray]) -> list[np.ndarray]:
        cfg = self._cfg
        order = np.argsort(np.array([c.shape[1] / float(c.shape[0]) for c in crops]))
        name, out = self._names["cls"]
        crops = list(crops)
        for start in range(0, len(crops), cfg.cls_batch_num):
            batch = order[start : start + cfg.cls_batch_num]
            x = np.stack([self._norm(crops[i], cfg.cls_image_shape, cfg.cls_image_shape[2]) for i in batch])
            prob = np.asarray(session.infer({name: x}, [out])[out]).reshape(len(batch), -1)
            for i, row in zip(batch, prob, strict=True):
                k = int(row.argmax())
                label = cfg.cls_labels[k] if k < len(cfg.cls_labels) else str(k)
                if "180" in label and row[k] > cfg.cls_thresh:
                    crops[i] = cv2.rotate(crops[i], cv2.ROTATE_180)
        return crops

    def recognise(self, session: Session, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        cfg = self._cfg
        c, h, w = cfg.rec_image_shape
        order = np.argsort(np.array([cr.shape[1] / float(cr.shape[0]) for cr in crops]))
        name, out = self._names["rec"]
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for start in range(0, len(crops), cfg.rec_batch_num):
            batch = order[start : start + cfg.rec_batch_num]
            max_ratio = max([w / h] + [crops[i].shape[1] / crops[i].shape[0] for i in batch])
            width = int(h * max_ratio)
            x = np.stack([self._norm(crops[i], (c, h, w), width) for i in batch])
            prob = np.asarray(session.infer({name: x}, [out])[out], dtype=np.float32)
            for i, row in zip(batch, prob, strict=True):
                results[i] = self._ctc(row)
        return results

    def _ctc(self, prob: np.ndarray) -> tuple[str, float]:
        idx = prob.argmax(axis=1)
        best = prob.max(axis=1)
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        chars = self._characters
        text = "".join(chars[k] if k < len(chars) else "" for k in idx[keep])
        score = float(np.mean(best[keep])) if keep.any() else 0.0
        return text, score

    def run(
        self, session: Session | Mapping[str, Session], inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        sessions = _roles(session)
        images = media_items(require(inputs, IMAGE_INPUT), IMAGE_INPUT)
        if len(images) != 1:
            raise ValueError(f"input {IMAGE_INPUT} must hold one image, got {len(images)}")
        raw = self.decode(images[0])
        raw_h, raw_w = raw.shape[:2]
        img, ratio_h, ratio_w = self._fit(raw)
        img, pad = self._letterbox(img)
        boxes = self.detect(sessions["det"], img)
        texts: list[tuple[str, float]] = []
        if boxes:
            crops = [_crop(img, b) for b in boxes]
            if self._use_cls:
                crops = self.classify(sessions["cls"], crops)
            texts = self.recognise(sessions["rec"], crops)
        kept = [(b, t, s) for b, (t, s) in zip(boxes, texts, strict=True) if s >= self._cfg.text_score]
        out = np.array([b for b, _, _ in kept], dtype=np.float32).reshape(-1, 4, 2)
        out[:, :, 1] -= pad
        out[:, :, 0] *= ratio_w
        out[:, :, 1] *= ratio_h
        out = np.maximum(out, 0)
        out[:, :, 0] = np.minimum(out[:, :, 0], raw_w)
        out[:, :, 1] = np.minimum(out[:, :, 1], raw_h)
        return {
            "boxes": out,
            "texts": np.array([t.encode() for _, t, _ in kept], dtype=object).reshape(-1),
            "scores": np.array([s for _, _, s in kept], dtype=np.float32),
        }


def _roles(sessions: Session | Mapping[str, Session]) -> Mapping[str, Session]:
    if not isinstance(sessions, Mapping):
        raise ValueError(
            f"{TASK} runs several models: give a mapping of role -> session "
            f"(required {', '.join(MODEL_ROLES[0])}; optional {', '.join(MODEL_ROLES[1])})"
        )
    missing = [r for r in MODEL_ROLES[0] if r not in sessions]
    unknown = [r for r in sessions if r not in MODEL_ROLES[0] + MODEL_ROLES[1]]
    if missing or unknown:
        parts = ([f"missing model(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown role(s) {', '.join(unknown)}"] if unknown else []
        )
        raise ValueError(
            f"{TASK}: {'; '.join(parts)}; roles are {', '.join(MODEL_ROLES[0])} "
            f"(required) and {', '.join(MODEL_ROLES[1])} (optional)"
        )
    return sessions


def warmup_inputs(role: str) -> dict[str, np.ndarray]:
    """Sample inputs that a model of `role` can run (for load_first_workable's sample_inputs):
    the default warm-up's 1x1 image is too small for the detector's pooling."""
    shapes = {"det": (1, 3, 64, 64), "rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192)}
    if role not in shapes:
        raise ValueError(f"{TASK}: no role {role!r}; roles are {', '.join(shapes)}")
    return {"x": np.zeros(shapes[role], np.float32)}


def build(
    settings: Mapping[str, Any], model_dir: Path | None, session: Session | Mapping[str, Session]
) -> Ocr:
    cfg = parse_settings(OcrSettings, settings, TASK)
    sessions = _roles(session)
    return Ocr(cfg, load_characters(cfg, model_dir), sessions)


__all__: Sequence[str] = ["MODEL_ROLES", "Ocr", "OcrSettings", "build", "onnx_metadata", "warmup_inputs"]
