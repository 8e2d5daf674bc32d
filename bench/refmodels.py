"""The benchmark's reference models: where each comes from, what OpenVINO runs instead when
it cannot read the model itself, and the inputs of a batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import models

Feed = Callable[[int], dict[str, np.ndarray[Any, Any]]]

# Input sizes: the detector at 320x320 (PaddleOCR's default is 640 on the long side, 4x
# the pixels; 320 keeps a full run within its time budget on a 2-core gateway), the
# recogniser at its fixed 48-pixel height and a 320-pixel-wide text line.
OCR_DET_SIZE = 320
OCR_REC_SHAPE = (3, 48, 320)
SILERO_WINDOW = 512  # samples at 16 kHz


@dataclass
class RefModel:
    name: str
    title: str
    path: Path | None  # what ONNX Runtime and the agent get; None: skipped
    feed: Feed | None = None
    ov_path: Path | None = None  # what OpenVINO gets (a twin when it cannot read `path`)
    ov_note: str = ""  # why OpenVINO runs a twin, or cannot run at all
    health: dict[str, Any] | None = None  # the deploy's health gate (its inputs feed warm-up)
    e2e: bool = True  # also measured through the agent
    raw: bool = True  # also measured on the runtimes directly
    batching: dict[str, Any] | None = None  # the manifest's batching for the agent
    modes: tuple[str, ...] = ("binary", "json")  # payloads sent through the agent
    skipped: str = ""  # why the model is not measured at all
    info: dict[str, Any] = field(default_factory=dict)


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _health_input(name: str, shape: tuple[int, ...], datatype: str, value: float) -> dict[str, Any]:
    count = int(np.prod(shape))
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": [value] * count}


def mobilenet(work: Path) -> RefModel:
    import onnx

    path = models.build_mobilenet_like(work)
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    image = _rng().random((8, 3, 224, 224), dtype=np.float32)
    return RefModel(
        "mobilenet", "MobileNet-like CNN 224x224", path,
        feed=lambda b: {"image": image[:b]}, ov_path=path,
        info={"input": "image FP32 [N,3,224,224]", "params_m": round(params / 1e6, 2)},
    )


def mobilenet_batched(base: RefModel, max_batch: int = 8, max_delay_ms: float = 2.0) -> RefModel:
    """The same CNN deployed with the agent's dynamic batching on (binary payloads only)."""
    return RefModel(
        "mobilenet_b8", f"{base.title}, agent batching max_batch {max_batch}, "
        f"max_delay_ms {max_delay_ms:g}", base.path, feed=base.feed, ov_path=base.ov_path,
        raw=False, batching={"max_batch": max_batch, "max_delay_ms": max_delay_ms},
        modes=("binary",), info={**base.info, "same_model_as": base.name},
    )


def digits(work: Path) -> tuple[RefModel, RefModel]:
    import onnx.utils

    d = models.build_digits(work)
    x = np.concatenate([d.x_test] * 2)[:64].astype(np.float32)
    full = RefModel(
        "digits", "scikit-learn digits MLP (skl2onnx)", d.path, feed=lambda b: {"x": x[:b]},
        ov_path=None,
        ov_note="OpenVINO cannot read scikit-learn's ai.onnx.ml ops; see 'digits_probs' for "
                "the same MLP cut at its probabilities output",
        info={"input": "x FP32 [N,64]"},
    )
    cut = work / "digits_probs.onnx"
    if not cut.exists():
        onnx.utils.extract_model(str(d.path), str(cut), ["x"], ["probabilities"])
    probs = RefModel(
        "digits_probs", "digits MLP cut at 'probabilities' (no ai.onnx.ml ops)", cut,
        feed=lambda b: {"x": x[:b]}, ov_path=cut, e2e=False,
        info={"input": "x FP32 [N,64]", "how": "onnx.utils.extract_model(..., ['probabilities'])"},
    )
    return full, probs


def silero() -> RefModel:
    try:
        path = models.silero_vad_path()
    except FileNotFoundError as exc:
        return RefModel("silero_vad", "Silero VAD", None, skipped=str(exc))
    twin = path.parent / "silero_vad_op18_ifless.onnx"
    audio = (_rng().standard_normal((8, SILERO_WINDOW)) * 0.1).astype(np.float32)

    def feed(b: int) -> dict[str, np.ndarray[Any, Any]]:
        return {"input": audio[:b], "state": np.zeros((2, b, 128), np.float32),
                "sr": np.array(16000, np.int64)}

    return RefModel(
        "silero_vad", f"Silero VAD ({SILERO_WINDOW} samples at 16 kHz, with state)", path,
        feed=feed, ov_path=twin if twin.is_file() else None,
        ov_note=("OpenVINO cannot convert the If node of silero_vad.onnx; OpenVINO figures "
                 "are for the wheel's silero_vad_op18_ifless.onnx twin") if twin.is_file()
        else "OpenVINO cannot convert the If node of silero_vad.onnx (and no if-less twin)",
        # The synthetic warm-up cannot run Silero: it needs a real window and sample rate.
        health={"inputs": [_health_input("input", (1, SILERO_WINDOW), "FP32", 0.0),
                           {"name": "sr", "datatype": "INT64", "shape": [], "data": [16000]}]},
        info={"input": "input FP32 [N,512], state FP32 [2,N,128], sr INT64 []",
              "ov_twin": twin.name if twin.is_file() else None},
    )


def paddleocr() -> list[RefModel]:
    folder = models.rapidocr_models_dir()
    if folder is None:
        why = ("the rapidocr-onnxruntime wheel is not installed "
               "(pip install --no-deps rapidocr-onnxruntime ships the PaddleOCR models)")
        return [RefModel("ocr_det", "PaddleOCR det", None, skipped=why),
                RefModel("ocr_rec", "PaddleOCR rec", None, skipped=why)]
    out = []
    det = sorted(folder.glob("*det*.onnx"))
    rec = sorted(folder.glob("*rec*.onnx"))
    page = _rng().random((8, 3, OCR_DET_SIZE, OCR_DET_SIZE), dtype=np.float32)
    line = _rng().random((8, *OCR_REC_SHAPE), dtype=np.float32)
    if det:
        out.append(RefModel(
            "ocr_det", f"PaddleOCR det ({det[0].stem}) {OCR_DET_SIZE}x{OCR_DET_SIZE}", det[0],
            feed=lambda b: {"x": page[:b]}, ov_path=det[0],
            # The health inputs feed the agent's auto-tune: a page of the size the jobs
            # have, or it would time the runtimes on an image that is not what it serves.
            health={"inputs": [_health_input("x", (1, 3, OCR_DET_SIZE, OCR_DET_SIZE), "FP32", 0.5)]},
            info={"input": f"x FP32 [N,3,{OCR_DET_SIZE},{OCR_DET_SIZE}]", "file": det[0].name},
        ))
    else:
        out.append(RefModel("ocr_det", "PaddleOCR det", None, skipped=f"no *det*.onnx in {folder}"))
    if rec:
        out.append(RefModel(
            "ocr_rec", f"PaddleOCR rec ({rec[0].stem}) {OCR_REC_SHAPE[1]}x{OCR_REC_SHAPE[2]}",
            rec[0], feed=lambda b: {"x": line[:b]}, ov_path=rec[0],
            health={"inputs": [_health_input("x", (1, *OCR_REC_SHAPE), "FP32", 0.5)]},
            info={"input": f"x FP32 [N,{','.join(map(str, OCR_REC_SHAPE))}]", "file": rec[0].name},
        ))
    else:
        out.append(RefModel("ocr_rec", "PaddleOCR rec", None, skipped=f"no *rec*.onnx in {folder}"))
    return out


ALL = ("mobilenet", "mobilenet_b8", "digits", "digits_probs", "silero_vad", "ocr_det", "ocr_rec")


def build(work: Path, names: list[str] | None = None) -> list[RefModel]:
    """The reference models named (default: all), built or found; skipped ones say why."""
    wanted = set(names or ALL)
    unknown = wanted - set(ALL)
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL)}")
    work.mkdir(parents=True, exist_ok=True)
    found: list[RefModel] = []
    if wanted & {"mobilenet", "mobilenet_b8"}:
        cnn = mobilenet(work)
        found += [m for m in (cnn, mobilenet_batched(cnn)) if m.name in wanted]
    if wanted & {"digits", "digits_probs"}:
        full, probs = digits(work)
        found += [m for m in (full, probs) if m.name in wanted]
    if "silero_vad" in wanted:
        found.append(silero())
    if wanted & {"ocr_det", "ocr_rec"}:
        found += [m for m in paddleocr() if m.name in wanted]
    return found
