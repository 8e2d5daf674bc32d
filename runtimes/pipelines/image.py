"""The `image-classification` task: encoded images in, top-k labels and scores out.

Each job sends `image` (BYTES, one JPEG, PNG or WebP file per element). Every image is
decoded with pillow, turned upright (EXIF orientation), converted to the model's colour
mode, resized and centre-cropped to the model's input size, scaled and normalised, and laid
out as the model wants (NCHW, NHWC, or flattened); the scores output then gives the top-k
classes. All of it is set by `settings`; the keys are listed in docs/pipelines.md.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.datatypes import to_numpy_dtype
from edgeinfer.runtimes.pipelines.base import (
    Pipeline,
    media_items,
    parse_settings,
    pick_input,
    require,
    sniff_image,
)

TASK = "image-classification"
IMAGE_INPUT = "image"
DEFAULT_LABELS_FILE = "labels.txt"

Positive = Annotated[float, msgspec.Meta(gt=0)]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    input: str | None = None  # model input fed with the pixels; default its only input
    output: str | None = None  # model output holding class scores; default its first float one
    size: tuple[Annotated[int, msgspec.Meta(ge=1)], Annotated[int, msgspec.Meta(ge=1)]] | None = None
    layout: Literal["NCHW", "NHWC", "flat"] | None = None  # default: from the input's shape
    color: Literal["RGB", "BGR", "L"] = "RGB"
    resize: Literal["crop", "stretch"] = "crop"
    crop_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[Positive, ...] = (1.0,)
    softmax: bool = False
    top_k: Annotated[int, msgspec.Meta(ge=1)] = 5
    labels: tuple[str, ...] | None = None
    labels_file: str | None = None
    formats: tuple[Literal["JPEG", "PNG", "WEBP"], ...] = ("JPEG", "PNG", "WEBP")
    max_pixels: Annotated[int, msgspec.Meta(ge=1)] = 40_000_000
    exif_transpose: bool = True


def _layout_of(spec: TensorSpec, wanted: str | None, channels: int) -> str:
    rank = len(spec.shape)
    if wanted is not None:
        need = 2 if wanted == "flat" else 4
        if rank != need:
            raise ValueError(
                f"{TASK}: layout {wanted} needs a rank-{need} model input; "
                f"{spec.name} has shape {list(spec.shape)}"
            )
        return wanted
    if rank == 2:
        return "flat"
    if rank == 4:
        if spec.shape[1] == channels:
            return "NCHW"
        if spec.shape[3] == channels:
            return "NHWC"
        return "NCHW"
    raise ValueError(
        f"{TASK}: cannot feed an image to input {spec.name} of shape {list(spec.shape)}: "
        "it must be [N, C, H, W], [N, H, W, C] or [N, H*W*C]"
    )


def _load_labels(cfg: ImageSettings, model_dir: Path | None) -> tuple[str, ...] | None:
    if cfg.labels is not None:
        if cfg.labels_file is not None:
            raise ValueError(f"{TASK} settings: give labels or labels_file, not both")
        return cfg.labels
    if cfg.labels_file is None:
        if model_dir is None or not (model_dir / DEFAULT_LABELS_FILE).is_file():
            return None
        path = model_dir / DEFAULT_LABELS_FILE
    else:
        rel = Path(cfg.labels_file)
        if model_dir is None or rel.is_absolute() or ".." in rel.parts:
            raise ValueError(
                f"{TASK} settings: labels_file {cfg.labels_file!r} must be a plain file name "
                "inside the model's folder"
            )
        path = model_dir / rel
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{TASK}: cannot read labels file {path.name}: {exc}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


class ImageClassification(Pipeline):
    task = TASK

    def __init__(self, cfg: ImageSettings, labels: tuple[str, ...] | None, session: Session) -> None:
        self._cfg = cfg
        self._labels = labels
        self._channels = 1 if cfg.color == "L" else 3
        spec = pick_input(session, cfg.input, TASK)
        self._input = spec
        self._layout = _layout_of(spec, cfg.layout, self._channels)
        self._dtype = to_numpy_dtype(spec.datatype)
        if self._dtype.kind not in "fiu":
            raise ValueError(f"{TASK}: input {spec.name} is {spec.datatype}, not a numeric tensor")
        self._size = self._resolve_size(spec)
        for key, values in (("mean", cfg.mean), ("std", cfg.std)):
            if len(values) not in (1, self._channels):
                raise ValueError(
                    f"{TASK} settings: {key} needs 1 or {self._channels} values for colour "
                    f"{cfg.color}, got {len(values)}"
                )
        self._mean = np.asarray(cfg.mean, np.float32)
        self._std = np.asarray(cfg.std, np.float32)
        floats = [o for o in session.outputs if o.datatype in ("FP32", "FP16", "FP64")]
        if cfg.output is not None:
            found = [o for o in session.outputs if o.name == cfg.output]
            if not found:
                names = ", ".join(o.name for o in session.outputs)
                raise ValueError(f"{TASK}: the model has no output {cfg.output!r}; it has {names}")
            self._output = found[0]
        elif floats:
            self._output = floats[0]
        else:
            raise ValueError(f"{TASK}: the model has no float output to read class scores from")
        classes = self._output.shape[-1] if self._output.shape else -1
        if labels is not None and classes > 0 and len(labels) != classes:
            raise ValueError(
                f"{TASK}: {len(labels)} labels for {classes} classes of output {self._output.name}"
            )
        self._batched = bool(spec.shape) and spec.shape[0] < 0

    def _resolve_size(self, spec: TensorSpec) -> tuple[int, int]:
        shape = spec.shape
        if self._layout == "flat":
            if self._cfg.size is None:
                raise ValueError(
                    f"{TASK} settings: input {spec.name} is flat {list(shape)}; set size [height, width]"
                )
            h, w = self._cfg.size
            if shape[1] > 0 and shape[1] != h * w * self._channels:
                raise ValueError(
                    f"{TASK} settings: size {h}x{w} with {self._channels} channel(s) gives "
                    f"{h * w * self._channels} values; input {spec.name} takes {shape[1]}"
                )
            return h, w
        c_dim, h_dim, w_dim = (1, 2, 3) if self._layout == "NCHW" else (3, 1, 2)
        if shape[c_dim] > 0 and shape[c_dim] != self._channels:
            raise ValueError(
                f"{TASK}: input {spec.name} {list(shape)} has {shape[c_dim]} channel(s); colour "
                f"{self._cfg.color} gives {self._channels}"
            )
        model_hw = (shape[h_dim], shape[w_dim])
        if self._cfg.size is not None:
            for want, have in zip(self._cfg.size, model_hw, strict=True):
                if have > 0 and have != want:
                    raise ValueError(
                        f"{TASK} settings: size {list(self._cfg.size)} does not fit input "
                        f"{spec.name} {list(shape)}"
                    )
            return self._cfg.size
        if model_hw[0] <= 0 or model_hw[1] <= 0:
            raise ValueError(
                f"{TASK} settings: input {spec.name} {list(shape)} has a dynamic size; set size"
            )
        return model_hw

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(IMAGE_INPUT, "BYTES", (-1,))]

    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec("labels", "BYTES", (-1, -1)),
            TensorSpec("scores", "FP32", (-1, -1)),
            TensorSpec("classes", "INT64", (-1, -1)),
        ]

    def preprocess(self, data: bytes, index: int = 0) -> np.ndarray:
        """One encoded image as the model's input row (no batch dimension)."""
        cfg = self._cfg
        where = f"input {IMAGE_INPUT}[{index}]"
        fmt = sniff_image(data)
        try:
            with Image.open(io.BytesIO(data), formats=list(cfg.formats)) as opened:
                if opened.width * opened.height > cfg.max_pixels:
                    raise ValueError(
                        f"{where}: image of {opened.width}x{opened.height} pixels is over the "
                        f"limit of {cfg.max_pixels}"
                    )
                opened.load()
                im = ImageOps.exif_transpose(opened) if cfg.exif_transpose else opened
                im = im.convert("L" if cfg.color == "L" else "RGB")
        except UnidentifiedImageError:
            raise ValueError(
                f"{where}: not a {', '.join(cfg.formats)} image (first bytes {data[:8].hex()})"
            ) from None
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{where}: image too large: {exc}") from None
        except (OSError, SyntaxError, EOFError) as exc:
            # pillow says "image file is truncated", "broken data stream", ...
            raise ValueError(f"{where}: could not decode the {fmt}: {exc}") from None
        h, w = self._size
        if im.size != (w, h):
            im = self._resize(im, h, w)
        pixels = np.asarray(im, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if cfg.color == "BGR":
            pixels = pixels[:, :, ::-1]
        pixels = (pixels * np.float32(cfg.scale) - self._mean) / self._std
        if self._layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        elif self._layout == "flat":
            pixels = pixels.reshape(-1)
        if self._dtype.kind in "iu":
            info = np.iinfo(self._dtype)
            pixels = np.clip(np.rint(pixels), info.min, info.max)
        return np.ascontiguousarray(pixels, dtype=self._dtype)

    def _resize(self, im: Image.Image, h: int, w: int) -> Image.Image:
        resample = _RESAMPLE[self._cfg.interpolation]
        if self._cfg.resize == "stretch":
            return im.resize((w, h), resample)
        # Scale so the target fits inside the image, shrink the window by crop_ratio, and
        # take it from the centre: torchvision's Resize(s) + CenterCrop(c) is crop_ratio c/s.
        s = max(h / im.height, w / im.width) / self._cfg.crop_ratio
        box_w, box_h = w / s, h / s
        left, top = (im.width - box_w) / 2, (im.height - box_h) / 2
        return im.resize((w, h), resample, box=(left, top, left + box_w, top + box_h))

    def run(self, session: Session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = media_items(require(inputs, IMAGE_INPUT), IMAGE_INPUT)
        rows = [self.preprocess(data, i) for i, data in enumerate(images)]
        name, out = self._input.name, self._output.name
        if self._batched:
            scores = session.infer({name: np.stack(rows)}, [out])[out]
        else:
            scores = np.concatenate([session.infer({name: r[None]}, [out])[out] for r in rows])
        return self.postprocess(scores.reshape(len(rows), -1))

    def postprocess(self, scores: np.ndarray) -> dict[str, np.ndarray]:
        scores = scores.astype(np.float32, copy=False)
        if self._cfg.softmax:
            z = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores = z / z.sum(axis=1, keepdims=True)
        n_classes = scores.shape[1]
        if self._labels is not None and len(self._labels) != n_classes:
            raise ValueError(f"{TASK}: {len(self._labels)} labels for {n_classes} model classes")
        k = min(self._cfg.top_k, n_classes)
        # Stable sort on the negated scores: ties keep the lower class first.
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        names = self._labels or tuple(str(i) for i in range(n_classes))
        labels = np.array([[names[j].encode() for j in row] for row in top], dtype=object)
        return {
            "labels": labels.reshape(top.shape),
            "scores": np.take_along_axis(scores, top, axis=1),
            "classes": top.astype(np.int64),
        }


def build(
    settings: Mapping[str, Any], model_dir: Path | None, session: Session
) -> ImageClassification:
    cfg = parse_settings(ImageSettings, settings, TASK)
    return ImageClassification(cfg, _load_labels(cfg, model_dir), session)
