"""The voice-activity-detection pipeline against silero-vad's own `get_speech_timestamps`.

Speech is synthesised with espeak-ng into several files (varied sentences, pauses, speaking
rates and voices; single words and short clicks; white noise, a hum or music-like tones
under some; 8, 16, 22.05, 32, 44.1 and 48 kHz; one stereo). Our pipeline
(`build_pipeline("voice-activity-detection", ...)`) runs each file on ONNX Runtime with
silero_vad.onnx and on OpenVINO with the wheel's If-less export. The reference is
silero-vad itself, which needs torch, so it runs in the test-only environment .venv-ref
(scripts/bootstrap.sh makes it; the agent never has torch) through tests/vad_reference.py:
`load_silero_vad(onnx=True)` (the same silero_vad.onnx through its own OnnxWrapper) and
`get_speech_timestamps(wav_16k, model, sampling_rate=16000, return_seconds=False)` with
every other parameter at its default.

silero-vad takes 16 kHz audio (it only decimates multiples of 16 kHz, without a filter), so
for every file that is not 16 kHz mono the reference is given the very 16 kHz mono samples
our pipeline decoded and resampled: the comparison is about the VAD (windows, context,
state, segment rules), not about the resampler. One file is a native 16 kHz mono WAV, which
the reference reads itself with soundfile. Segments must agree in number, each start and
end within one window (512 samples, 32 ms). silero-vad's TorchScript model (silero_vad.jit,
`load_silero_vad()`) is a second reference, held to the same window against the ONNX one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from bench.models import silero_vad_path
from edgeinfer.runtimes.base import LoadOptions, Session
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import build_pipeline
from edgeinfer.runtimes.pipelines.audio import SAMPLE_RATE, WINDOW, VoiceActivityDetection, resample

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
HELPER = Path(__file__).with_name("vad_reference.py")
OPTS = LoadOptions(threads=1)
ESPEAK_RATE = 22050
TOL = WINDOW  # one window, in 16 kHz samples
# A generous bound for importing torch and running every file twice on a loaded 2-core box
# (about 10 s when idle); under pytest's own 300 s per test.
REF_TIMEOUT_S = 240


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes  # the file as sent to the pipeline
    rate: int
    native_16k: bool = False  # the reference reads the file itself


def _say(d: Path, text: str, *opts: str) -> np.ndarray:
    """espeak-ng's speech of `text` at 22.05 kHz, trimmed to where it is audible."""
    out = d / f"say{len(list(d.iterdir()))}.wav"
    subprocess.run(["espeak-ng", *opts, "-w", str(out), text], check=True, timeout=60)
    x, rate = sf.read(out, dtype="float32")
    assert rate == ESPEAK_RATE
    loud = np.flatnonzero(np.abs(x) > 0.01)
    clip: np.ndarray = x[loud[0] : loud[-1] + 1]
    return clip


def _compose(*parts: float | np.ndarray) -> np.ndarray:
    """Clips at 22.05 kHz with silences (floats, seconds) between them."""
    return np.concatenate([
        np.zeros(round(p * ESPEAK_RATE), np.float32) if isinstance(p, float) else p for p in parts
    ])


def _notes(n: int, rate: int, seed: int) -> np.ndarray:
    """Music-like background: quarter-second notes of a few harmonics with a decay."""
    rng = np.random.default_rng(seed)
    note = rate // 4
    t = np.arange(note) / rate
    out = np.zeros(n + note, np.float32)
    for start in range(0, n, note):
        f0 = 220.0 * 2 ** (int(rng.integers(0, 12)) / 12)
        tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
        out[start : start + note] = tone * np.exp(-6 * t)
    return out[:n]


def _file(x: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no speech to test on")
    d = tmp_path_factory.mktemp("vad-ref-speech")
    rng = np.random.default_rng(7)
    made: list[Case] = []

    def add(name: str, x: np.ndarray, rate: int, **kw: Any) -> None:
        made.append(Case(name, _file(x, rate), rate, **kw))

    # 1. Native 16 kHz mono WAV: two sentences, default voice and rate.
    x = _compose(0.8, _say(d, "The quick brown fox jumps over the lazy dog."), 1.0,
                 _say(d, "Edge gateways run inference close to the sensors."), 0.6)
    add("16k-mono-wav", resample(x, ESPEAK_RATE, 16000), 16000, native_16k=True)

    # 2. 8 kHz, slow speech (120 words a minute), three sentences, one pause only 250 ms long.
    def slow(text: str) -> np.ndarray:
        return _say(d, text, "-s", "120")

    x = _compose(0.5, slow("Please keep the door closed."), 0.35,
                 slow("The heating is on."), 0.25, slow("Thank you."), 0.7)
    add("8k-slow", resample(x, ESPEAK_RATE, 8000), 8000)

    # 3. espeak's own 22.05 kHz, fast speech with long gaps between words, white noise.
    x = _compose(0.4, _say(d, "one two three four five six", "-s", "230", "-g", "30"), 0.6,
                 _say(d, "Seven, eight. Nine and ten.", "-s", "260"), 0.5)
    x = x + rng.normal(0, 0.004, x.size).astype(np.float32)
    add("22k-fast-noise", x, ESPEAK_RATE)

    # 4. 44.1 kHz, a higher female voice over quarter-second notes that go on in the pauses.
    female = ("-v", "en-us+f3", "-p", "70")
    x = _compose(1.0, _say(d, "Is the temperature sensor still reporting?", *female), 0.9,
                 _say(d, "Yes, every ten seconds, over MQTT.", *female), 1.0)
    x44 = resample(x, ESPEAK_RATE, 44100)
    x44 = 0.8 * x44 + 0.05 * _notes(x44.size, 44100, seed=3)
    add("44k-voice-over-notes", x44, 44100)

    # 5. 48 kHz stereo: SSML pauses inside one utterance; the right channel quieter, with a
    #    50 Hz mains hum and its harmonics.
    ssml = ('<speak>Start the pump. <break time="600ms"/> Open valve three. '
            '<break time="150ms"/> Now close it. <break time="900ms"/> Done.</speak>')
    x = _compose(0.3, _say(d, ssml, "-m"), 0.8)
    x48 = resample(x, ESPEAK_RATE, 48000)
    t = np.arange(x48.size) / 48000
    hum = np.sum([0.01 / k * np.sin(2 * np.pi * 50 * k * t) for k in (1, 2, 3, 5)], axis=0)
    hum = hum.astype(np.float32)
    add("48k-stereo-hum", np.stack([x48, 0.5 * x48 + hum], axis=1), 48000)

    # 6. 44.1 kHz float WAV: a long sentence in a Scottish voice, tones alone before it.
    x = _compose(0.5, _say(d, "A gateway that loses its broker keeps its jobs on disk and "
                              "sends them again when the connection comes back.",
                           "-v", "en-gb-scotland", "-s", "190"), 0.7)
    x44 = resample(x, ESPEAK_RATE, 44100)
    lead = 0.1 * _notes(44100 * 2, 44100, seed=11)
    made.append(Case("44k-float-tones-then-speech",
                     _file(np.concatenate([lead, x44]), 44100, "FLOAT"), 44100))

    # 7. 32 kHz: single words, varied gaps (some shorter than the 100 ms that ends a
    #    segment), and two 20 ms clicks, too short to count as speech.
    words = ["yes", "no", "stop", "go", "left", "right", "up", "down", "again"]
    gaps = [0.4, 0.08, 0.6, 0.3, 0.15, 0.9, 0.2, 0.5, 0.35, 0.7]
    click = (0.3 * rng.standard_normal(round(0.02 * ESPEAK_RATE))).astype(np.float32)
    parts: list[float | np.ndarray] = []
    for i, (gap, word) in enumerate(zip(gaps, [*words, None], strict=True)):
        parts.append(gap)
        if i in (2, 6):
            parts += [click, 0.5]
        if word is not None:
            parts.append(_say(d, word, "-s", str(150 + 15 * i)))
    add("32k-single-words-clicks", resample(_compose(*parts), ESPEAK_RATE, 32000), 32000)
    return made


@pytest.fixture(scope="module")
def ort() -> Session:
    return ORT_CPU.load(silero_vad_path(), "CPU", OPTS)


def _vad(session: Session) -> VoiceActivityDetection:
    pipe = build_pipeline("voice-activity-detection", {}, None, session)
    assert isinstance(pipe, VoiceActivityDetection)
    return pipe


@pytest.fixture(scope="module")
def reference(cases: list[Case], ort: Session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What tests/vad_reference.py printed for every case, run in .venv-ref."""
    if not REF_PYTHON.exists():
        pytest.skip(
            "no .venv-ref: scripts/bootstrap.sh makes it only where torch 2.13.0's CPU wheel "
            "for this Python lies in /opt/wheels (or $EDGEINFER_TORCH_WHEEL names one); "
            "silero-vad's own get_speech_timestamps needs torch"
        )
    d = tmp_path_factory.mktemp("vad-ref-input")
    pipe = _vad(ort)
    request = []
    for i, case in enumerate(cases):
        if case.native_16k:
            path = d / f"{i}.wav"
            path.write_bytes(case.data)
        else:
            path = d / f"{i}.npy"
            np.save(path, pipe.decode(case.data))
        request.append({"name": case.name, "path": str(path)})
    (d / "request.json").write_text(json.dumps({"cases": request}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([str(REF_PYTHON), str(HELPER), str(d / "request.json")],
                          capture_output=True, text=True, timeout=REF_TIMEOUT_S, env=env)
    assert proc.returncode == 0, f"{HELPER.name} failed:\n{proc.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _in_samples(segments: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(segments, np.float64) * SAMPLE_RATE).astype(np.int64).reshape(-1, 2)


def _worst(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Largest start and end difference, in samples, of two equally long segment lists."""
    diff = np.abs(a - b)
    return (int(diff[:, 0].max()), int(diff[:, 1].max())) if diff.size else (0, 0)


def _ms(samples: int) -> float:
    return 1000 * samples / SAMPLE_RATE


def test_reference_runs_our_model_file(reference: dict[str, Any]) -> None:
    """The reference loads the same silero_vad.onnx (same wheel release) with torch's CPU build."""
    ours = silero_vad_path()
    assert reference["models"]["onnx"]["sha256"] == hashlib.sha256(ours.read_bytes()).hexdigest()
    assert reference["versions"]["silero-vad"] == version("silero-vad")
    assert reference["versions"]["torch"].startswith("2.13.0")
    assert "+cpu" in reference["versions"]["torch"]


@pytest.mark.parametrize(("variant", "backend"), [
    ("silero_vad.onnx", ORT_CPU),
    ("silero_vad_op18_ifless.onnx", OPENVINO),  # OpenVINO cannot convert the If of silero_vad.onnx
], ids=["onnxruntime", "openvino-ifless"])
def test_segments_match_silero_get_speech_timestamps(
    cases: list[Case], reference: dict[str, Any], variant: str, backend: Any
) -> None:
    session = backend.load(silero_vad_path().parent / variant, "CPU", OPTS)
    pipe = _vad(session)
    total, worst_start, worst_end, worst_prob = 0, 0, 0, 0.0
    for case in cases:
        ref = reference["cases"][case.name]
        theirs = np.array(ref["onnx"]["segments"], np.int64).reshape(-1, 2)
        ours = _in_samples(pipe.run(session, {"audio": np.array([case.data], dtype=object)})["segments"])
        assert theirs.shape[0] > 0, f"{case.name}: the reference found no speech"
        assert ours.shape == theirs.shape, f"{case.name}: ours {ours.tolist()} vs silero {theirs.tolist()}"
        start, end = _worst(ours, theirs)
        assert max(start, end) <= TOL, f"{case.name}: ours {ours.tolist()} vs silero {theirs.tolist()}"
        # Why they agree: the same audio gives the same per-window probabilities.
        audio = pipe.decode(case.data)
        assert audio.size == ref["samples"], case.name
        probs = np.array(pipe.probabilities(session, audio))
        assert probs.shape == (len(ref["onnx"]["probs"]),), case.name
        worst_prob = max(worst_prob, float(np.abs(probs - ref["onnx"]["probs"]).max()))
        total += ours.shape[0]
        worst_start, worst_end = max(worst_start, start), max(worst_end, end)
    assert worst_prob < 1e-3
    print(f"\n{backend.name} {variant} vs silero-vad get_speech_timestamps (ONNX): {len(cases)} files, "
          f"{total} segments, same count; max start diff {_ms(worst_start):.1f} ms, "
          f"max end diff {_ms(worst_end):.1f} ms; max probability diff {worst_prob:.2g}")


def test_silero_jit_model_agrees_with_its_onnx_model(cases: list[Case], reference: dict[str, Any]) -> None:
    """silero_vad.jit through silero-vad's own code, as a second reference."""
    if reference["jit_error"]:
        pytest.skip(f"no TorchScript reference: {reference['jit_error']}")
    total, worst_start, worst_end, worst_prob = 0, 0, 0, 0.0
    for case in cases:
        ref = reference["cases"][case.name]
        onnx = np.array(ref["onnx"]["segments"], np.int64).reshape(-1, 2)
        jit = np.array(ref["jit"]["segments"], np.int64).reshape(-1, 2)
        assert jit.shape == onnx.shape, f"{case.name}: jit {jit.tolist()} vs onnx {onnx.tolist()}"
        start, end = _worst(jit, onnx)
        assert max(start, end) <= TOL, f"{case.name}: jit {jit.tolist()} vs onnx {onnx.tolist()}"
        total += jit.shape[0]
        worst_start, worst_end = max(worst_start, start), max(worst_end, end)
        prob_diff = np.abs(np.subtract(ref["jit"]["probs"], ref["onnx"]["probs"]))
        worst_prob = max(worst_prob, float(prob_diff.max()))
    print(f"\nsilero-vad JIT vs ONNX: {len(cases)} files, {total} segments, same count; "
          f"max start diff {_ms(worst_start):.1f} ms, max end diff {_ms(worst_end):.1f} ms; "
          f"max probability diff {worst_prob:.2g}")
