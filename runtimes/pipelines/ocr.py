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
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgeinfer.contract.tasks import MULTI_MODEL_TASKS
from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.pipelines.base import Pipeline, media_items, parse_settings, require, sniff_image
from edgeinfer.runtimes.pipelines.ocr_geometry import (
    box_score,
    crop,
    mini_box,
    order_clockwise,
    scaled_to_32,
    sorted_boxes,
    unclip,
)
from edgeinfer.runtimes.pipelines.ocr_settings import TASK, OcrSettings, load_characters

IMAGE_INPUT = "image"
# Roles of the models one `ocr` version is made of: (required, optional).
MODEL_ROLES: tuple[tuple[str, ...], tuple[str, ...]] = MULTI_MODEL_TASKS[TASK]
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
        resized = scaled_to_32(img, ratio)
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
        resized = scaled_to_32(img, ratio)
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
            points, short = mini_box(contour)
            if short < 3:
                continue
            if cfg.score_mode == "fast":
                score = box_score(prob, points.reshape(-1, 2))
            else:
                score = box_score(prob, contour.reshape(-1, 2).astype(np.float32))
            if score < cfg.box_thresh:
                continue
            box, short = mini_box(unclip(points, cfg.unclip_ratio))
            if short < 5:
                continue
            box[:, 0] = np.clip(np.round(box[:, 0] / map_w * w), 0, w)
            box[:, 1] = np.clip(np.round(box[:, 1] / map_h * h), 0, h)
            box = order_clockwise(box.astype(np.int32).astype(np.float32))
            box[:, 0] = np.clip(box[:, 0], 0, w - 1).astype(np.int32)
            box[:, 1] = np.clip(box[:, 1], 0, h - 1).astype(np.int32)
            if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
                continue
            boxes.append(box)
        return sorted_boxes(boxes)

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
            crops = [crop(img, b) for b in boxes]
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


__all__: Sequence[str] = ["MODEL_ROLES", "Ocr", "OcrSettings", "build", "warmup_inputs"]
