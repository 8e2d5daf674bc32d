"""The `ocr` task's settings (docs/pipelines.md) and the character list `rec` reads with.

The list comes from the settings (`characters`), a file beside the models
(`characters_file`, default characters.txt) or, as PaddleOCR's exports keep it, the `rec`
model's ONNX metadata (read from the protobuf directly: no onnx package on a gateway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

TASK = "ocr"
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
