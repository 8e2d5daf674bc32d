"""The voice-activity-detection pipeline on Silero VAD: speech timestamps against silero-vad's
own source, resampling, espeak-ng sentences found in WAV, FLAC, OGG, stereo and 48 kHz, the
If-less exports on OpenVINO, silence and settings; malformed audio; a model that is not Silero.
"""

from __future__ import annotations

import ast
import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from bench.models import build_mlp, silero_vad_path
from edgeinfer.runtimes.base import LoadOptions, Session
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import build_pipeline
from edgeinfer.runtimes.pipelines.audio import SAMPLE_RATE, VadSettings, resample, speech_timestamps
from tests.helpers import blobs, to_png

OPTS = LoadOptions(threads=1)


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
    segments = pipe.run(vad, {"audio": blobs(_wav(x, rate))})["segments"]
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
        segments = pipe.run(vad, {"audio": blobs(data)})["segments"]
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
    data = blobs(_wav(x, rate))
    want = build_pipeline("voice-activity-detection", {}, None, vad).run(vad, {"audio": data})
    session = backend.load(silero_vad_path().parent / variant, "CPU", OPTS)
    got = build_pipeline("voice-activity-detection", {}, None, session).run(session, {"audio": data})
    np.testing.assert_allclose(got["segments"], want["segments"], atol=512 / SAMPLE_RATE)


def test_vad_silence_and_settings(vad: Session, spoken: Any) -> None:
    x, rate, _ = spoken
    pipe = build_pipeline("voice-activity-detection", {}, None, vad)
    silence = pipe.run(vad, {"audio": blobs(_wav(np.zeros(rate, np.float32), rate))})
    assert silence["segments"].shape == (0, 2)
    # A minimum silence longer than the gap between the sentences joins them.
    joined = build_pipeline("voice-activity-detection", {"min_silence_duration_ms": 2000}, None, vad)
    assert joined.run(vad, {"audio": blobs(_wav(x, rate))})["segments"].shape == (1, 2)


def test_malformed_audio_is_refused_and_the_next_call_works(vad: Session) -> None:
    pipe = build_pipeline("voice-activity-detection", {}, None, vad)
    tone = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    good = _wav(tone, 16000)
    bad = {
        "not audio": (b"this is not audio at all", "not a readable WAV, FLAC, OGG file"),
        "a PNG": (to_png(np.zeros((4, 4))), "not a readable WAV, FLAC, OGG file"),
        "empty": (b"", r"input audio\[0\] is empty"),
        "no samples": (_wav(np.zeros(0, np.float32), 16000), "holds no audio samples"),
        "header only": (good[:30], "not a readable"),
    }
    for name, (data, reason) in bad.items():
        with pytest.raises(ValueError, match=reason):
            pipe.run(vad, {"audio": blobs(data)})
        assert pipe.run(vad, {"audio": blobs(good)})["segments"].shape[1] == 2, name
    with pytest.raises(ValueError, match="must hold one file, got 2"):
        pipe.run(vad, {"audio": blobs(good, good)})
    limited = build_pipeline("voice-activity-detection", {"max_seconds": 0.25}, None, vad)
    with pytest.raises(ValueError, match=r"0.5 s of audio is over the limit of 0.25 s"):
        limited.run(vad, {"audio": blobs(good)})
    flac_only = build_pipeline("voice-activity-detection", {"formats": ["FLAC"]}, None, vad)
    with pytest.raises(ValueError, match="WAV audio is not accepted; send FLAC"):
        flac_only.run(vad, {"audio": blobs(good)})


def test_vad_needs_a_silero_model(model_dir: Path) -> None:
    session = ORT_CPU.load(build_mlp(model_dir), "CPU", OPTS)
    with pytest.raises(ValueError, match="needs a Silero VAD v5 model"):
        build_pipeline("voice-activity-detection", {}, None, session)

