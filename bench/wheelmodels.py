"""Reference models that installed wheels ship (silero-vad, rapidocr-onnxruntime), found
through the import system without importing their packages: nothing is downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def silero_vad_path() -> Path:
    """silero_vad.onnx from the installed silero-vad wheel.

    Found through the import system's spec, without importing the package (its __init__
    imports torch, which an edge gateway does not have). Its `If` node on the sample rate
    is what OpenVINO fails to convert.
    """
    spec = importlib.util.find_spec("silero_vad")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "data" / "silero_vad.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "silero_vad.onnx not found: the silero-vad wheel is not installed "
        "(pip install --no-deps silero-vad)"
        if spec is None
        else f"silero-vad is installed at {locations} but ships no data/silero_vad.onnx"
    )


# The PaddleOCR models the rapidocr-onnxruntime wheel ships, by the ocr pipeline's roles.
RAPIDOCR_MODELS = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}


def rapidocr_models_dir() -> Path | None:
    """The `models` folder of the installed rapidocr-onnxruntime wheel (found without
    importing it, which would import opencv), or None when the wheel is not installed."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "models"
        if (folder / RAPIDOCR_MODELS["rec"]).is_file():
            return folder
    return None
