"""silero-vad's own speech timestamps, for tests/test_vad_reference.py.

Runs in the test-only environment .venv-ref (torch CPU, onnxruntime, soundfile and the
silero-vad wheel; scripts/bootstrap.sh makes it), never in the agent's .venv:

    .venv-ref/bin/python tests/vad_reference.py REQUEST.json

REQUEST is {"cases": [{"name": ..., "path": ...}, ...]}. Each path is either a `.npy` of
16 kHz mono float32 samples or a 16 kHz mono sound file, which is read here with soundfile
(float32, as torchaudio would scale it), not with silero-vad's `read_audio` (that needs
torchaudio or torchcodec; the model does not).

For every case this calls `get_speech_timestamps(wav, model, sampling_rate=16000,
return_seconds=False)` with every other parameter left at its default, once with
`load_silero_vad(onnx=True)` (silero_vad.onnx through silero-vad's OnnxWrapper) and once
with `load_silero_vad()` (the TorchScript model, silero_vad.jit). The model is wrapped in a
proxy that only records each window's speech probability on its way back. Prints one JSON
object on stdout:

    {"versions": {...}, "models": {"onnx": {"path", "sha256"}, "jit": {...}},
     "cases": {name: {"samples": n, "onnx": {"segments": [[start, end], ...], "probs": [...]},
                      "jit": {...} or null}},
     "jit_error": null or the reason the TorchScript model could not run}
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

SAMPLE_RATE = 16_000


class Recorder:
    """Passes silero-vad's calls through to its model and keeps each window's probability."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.probs: list[float] = []

    def reset_states(self) -> None:
        self.probs = []
        self.model.reset_states()

    def __call__(self, chunk: Any, sr: int) -> Any:
        out = self.model(chunk, sr)
        self.probs.append(float(out.item()))
        return out


def _load(path: Path) -> Any:
    import numpy as np
    import soundfile as sf
    import torch

    if path.suffix == ".npy":
        x = np.load(path).astype(np.float32, copy=False)
    else:
        x, rate = sf.read(path, dtype="float32")
        if rate != SAMPLE_RATE or x.ndim != 1:
            raise ValueError(f"{path}: want 16 kHz mono, got {rate} Hz, shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(request_path: str) -> int:
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad
    from silero_vad.utils_vad import OnnxWrapper

    torch.set_num_threads(1)
    request = json.loads(Path(request_path).read_text())
    data_dir = Path(sys.modules["silero_vad"].__file__ or "").parent / "data"

    models: dict[str, Any] = {}
    info: dict[str, Any] = {}
    onnx = load_silero_vad(onnx=True)
    assert isinstance(onnx, OnnxWrapper)
    models["onnx"] = onnx
    info["onnx"] = {"path": str(data_dir / "silero_vad.onnx"),
                    "sha256": _sha256(data_dir / "silero_vad.onnx")}
    jit_error = None
    try:
        models["jit"] = load_silero_vad()
        info["jit"] = {"path": str(data_dir / "silero_vad.jit"),
                       "sha256": _sha256(data_dir / "silero_vad.jit")}
    except Exception as exc:  # reported, not hidden: the test says why there is no JIT reference
        jit_error = f"load_silero_vad() failed: {type(exc).__name__}: {exc}"

    cases: dict[str, Any] = {}
    for case in request["cases"]:
        wav = _load(Path(case["path"]))
        result: dict[str, Any] = {"samples": int(wav.numel()), "jit": None}
        for kind, model in models.items():
            recorder = Recorder(model)
            try:
                spans = get_speech_timestamps(wav, recorder, sampling_rate=SAMPLE_RATE,
                                              return_seconds=False)
            except Exception as exc:
                if kind != "jit":
                    raise
                jit_error = f"the TorchScript model failed on {case['name']}: {type(exc).__name__}: {exc}"
                models.pop("jit")
                break
            result[kind] = {"segments": [[int(s["start"]), int(s["end"])] for s in spans],
                            "probs": recorder.probs}
        cases[case["name"]] = result

    out = {
        "versions": {name: version(name) for name in ("torch", "silero-vad", "onnxruntime", "numpy")},
        "models": info,
        "cases": cases,
        "jit_error": jit_error,
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__ or "")
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
