"""The `voice-activity-detection` task: an audio file in, speech segments (seconds) out.

The job sends `audio` (BYTES, one WAV, FLAC or OGG file). It is decoded with soundfile,
mixed down to mono, resampled to 16 kHz, and run through Silero VAD (v5 ONNX) 512 samples
at a time, each window preceded by the last 64 samples of the one before and the model's
recurrent `state` carried from window to window, as silero-vad's own OnnxWrapper does.
The per-window speech probabilities become segments by silero-vad's
`get_speech_timestamps` rules (thresholds, minimum durations, padding; the same defaults).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import soundfile as sf

from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.pipelines.base import Pipeline, media_items, parse_settings, require

TASK = "voice-activity-detection"
AUDIO_INPUT = "audio"
SAMPLE_RATE = 16_000
WINDOW = 512  # samples per model call at 16 kHz
CONTEXT = 64  # samples of the previous window prepended to each call
_MODEL_INPUTS = ("input", "state")  # and `sr`, unless the export is 16 kHz only
_MODEL_OUTPUTS = ("output", "stateN")
# libsndfile's names for WAV variants (WAVE_FORMAT_EXTENSIBLE, 64-bit RIFF).
_FORMAT_FAMILY = {"WAVEX": "WAV", "RF64": "WAV"}

Ms = Annotated[float, msgspec.Meta(ge=0)]
Prob = Annotated[float, msgspec.Meta(ge=0, le=1)]


class VadSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    threshold: Prob = 0.5
    neg_threshold: Prob | None = None  # default max(threshold - 0.15, 0.01)
    min_speech_duration_ms: Ms = 250
    max_speech_duration_s: Annotated[float, msgspec.Meta(gt=0)] | None = None  # None: no limit
    min_silence_duration_ms: Ms = 100
    speech_pad_ms: Ms = 30
    min_silence_at_max_speech: Ms = 98
    use_max_poss_sil_at_max_speech: bool = True
    formats: tuple[Literal["WAV", "FLAC", "OGG", "MP3"], ...] = ("WAV", "FLAC", "OGG")
    max_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE, half_width: int = 16) -> np.ndarray:
    """Band-limited polyphase resampling of a mono float signal, with numpy only.

    Each output sample is a Kaiser-windowed sinc interpolation (beta 8.6, `half_width`
    zero crossings each side) of the input around its position; when downsampling, the
    sinc is stretched so that it also low-passes below the new Nyquist frequency (cut-off
    at 95% of it). With sr_out/sr_in = up/down in lowest terms there are only `up`
    distinct filter phases: they are computed once per call, then each output sample is one
    dot product. Output length is floor(len(x) * sr_out / sr_in).
    """
    if sr_in == sr_out or x.size == 0:
        return x.astype(np.float32, copy=False)
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    ratio = up / down
    cutoff = min(1.0, ratio) * 0.95  # as a fraction of the input's Nyquist frequency
    half = half_width / min(1.0, ratio)  # filter half-length in input samples
    reach = math.ceil(half)
    offsets = np.arange(-reach, reach + 1)  # input taps around floor(position)
    # Phase p: output position lies (p * down % up) / up input samples after its floor.
    frac = (np.arange(up) * down % up) / up
    d = frac[:, None] - offsets[None, :]  # [up, taps] distance from each tap
    window = np.i0(8.6 * np.sqrt(np.clip(1.0 - (d / half) ** 2, 0.0, None))) / np.i0(8.6)
    table = np.where(np.abs(d) < half, cutoff * np.sinc(cutoff * d) * window, 0.0).astype(np.float32)

    n_out = (x.size * up) // down
    padded = np.concatenate([np.zeros(reach, np.float32), x.astype(np.float32, copy=False),
                             np.zeros(reach + 1, np.float32)])
    frames = np.lib.stride_tricks.sliding_window_view(padded, offsets.size)
    out = np.empty(n_out, np.float32)
    block = max(up, (1 << 20) // offsets.size // up * up)  # bounded memory, whole phase cycles
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out), dtype=np.int64)
        base = n * down // up  # floor of the input position; frame `base` starts at base - reach
        out[start : start + n.size] = np.einsum("nt,nt->n", frames[base], table[n % up])
    return out


def speech_timestamps(
    probs: Sequence[float], cfg: VadSettings, audio_length_samples: int
) -> list[tuple[int, int]]:
    """Speech segments (start, end) in 16 kHz samples from per-window probabilities.

    A port of silero-vad's `get_speech_timestamps_from_probs` (v6) at 16 kHz, same rules,
    same defaults; tests/test_pipelines_vad.py checks it against that function's source.
    """
    sr, window = SAMPLE_RATE, WINDOW
    threshold = cfg.threshold
    neg_threshold = cfg.neg_threshold if cfg.neg_threshold is not None else max(threshold - 0.15, 0.01)
    min_speech = sr * cfg.min_speech_duration_ms / 1000
    pad = sr * cfg.speech_pad_ms / 1000
    max_speech = (
        math.inf if cfg.max_speech_duration_s is None
        else sr * cfg.max_speech_duration_s - window - 2 * pad
    )
    min_silence = sr * cfg.min_silence_duration_ms / 1000
    min_silence_at_max = sr * cfg.min_silence_at_max_speech / 1000
    use_max_poss = cfg.use_max_poss_sil_at_max_speech

    triggered = False
    speeches: list[dict[str, float]] = []
    current: dict[str, float] = {}
    temp_end = 0.0
    prev_end = next_start = 0.0
    possible_ends: list[tuple[float, float]] = []

    for i, prob in enumerate(probs):
        cur = float(window * i)
        if prob >= threshold and temp_end:
            sil_dur = cur - temp_end
            if sil_dur > min_silence_at_max:
                possible_ends.append((temp_end, sil_dur))
            temp_end = 0
            if next_start < prev_end:
                next_start = cur
        if prob >= threshold and not triggered:
            triggered = True
            current["start"] = cur
            continue
        if triggered and cur - current["start"] > max_speech:
            if use_max_poss and possible_ends:
                prev_end, dur = max(possible_ends, key=lambda e: e[1])
                current["end"] = prev_end
                speeches.append(current)
                current = {}
                next_start = prev_end + dur
                if next_start < prev_end + cur:
                    current["start"] = next_start
                else:
                    triggered = False
                prev_end = next_start = temp_end = 0
                possible_ends = []
            elif prev_end:
                current["end"] = prev_end
                speeches.append(current)
                current = {}
                if next_start < prev_end:
                    triggered = False
                else:
                    current["start"] = next_start
                prev_end = next_start = temp_end = 0
                possible_ends = []
            else:
                current["end"] = cur
                speeches.append(current)
                current = {}
                prev_end = next_start = temp_end = 0
                triggered = False
                possible_ends = []
                continue
        if prob < neg_threshold and triggered:
            if not temp_end:
                temp_end = cur
            sil_now = cur - temp_end
            if not use_max_poss and sil_now > min_silence_at_max:
                prev_end = temp_end
            if sil_now < min_silence:
                continue
            current["end"] = temp_end
            if current["end"] - current["start"] > min_speech:
                speeches.append(current)
            current = {}
            prev_end = next_start = temp_end = 0
            triggered = False
            possible_ends = []
            continue

    if current and audio_length_samples - current["start"] > min_speech:
        current["end"] = audio_length_samples
        speeches.append(current)

    for i, speech in enumerate(speeches):
        if i == 0:
            speech["start"] = int(max(0, speech["start"] - pad))
        if i != len(speeches) - 1:
            gap = speeches[i + 1]["start"] - speech["end"]
            if gap < 2 * pad:
                speech["end"] += int(gap // 2)
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - gap // 2))
            else:
                speech["end"] = int(min(audio_length_samples, speech["end"] + pad))
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - pad))
        else:
            speech["end"] = int(min(audio_length_samples, speech["end"] + pad))
    return [(int(s["start"]), int(s["end"])) for s in speeches]


class VoiceActivityDetection(Pipeline):
    task = TASK

    def __init__(self, cfg: VadSettings, session: Session) -> None:
        have_in = {s.name for s in session.inputs}
        have_out = {s.name for s in session.outputs}
        if not set(_MODEL_INPUTS) <= have_in or not set(_MODEL_OUTPUTS) <= have_out:
            raise ValueError(
                f"{TASK} needs a Silero VAD v5 model (inputs input, state[, sr]; outputs "
                f"{', '.join(_MODEL_OUTPUTS)}); this one has inputs {', '.join(sorted(have_in))} "
                f"and outputs {', '.join(sorted(have_out))}"
            )
        self._cfg = cfg
        self._takes_sr = "sr" in have_in

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(AUDIO_INPUT, "BYTES", (1,))]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("segments", "FP32", (-1, 2))]

    def decode(self, data: bytes) -> np.ndarray:
        """The file as mono float32 at 16 kHz."""
        where = f"input {AUDIO_INPUT}"
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                if _FORMAT_FAMILY.get(f.format, f.format) not in self._cfg.formats:
                    raise ValueError(
                        f"{where}: {f.format} audio is not accepted; send {', '.join(self._cfg.formats)}"
                    )
                if f.frames > self._cfg.max_seconds * f.samplerate:
                    raise ValueError(
                        f"{where}: {f.frames / f.samplerate:.1f} s of audio is over the limit of "
                        f"{self._cfg.max_seconds:g} s"
                    )
                rate = int(f.samplerate)
                frames = f.read(dtype="float32", always_2d=True)
        except sf.LibsndfileError as exc:
            raise ValueError(
                f"{where}: not a readable {', '.join(self._cfg.formats)} file ({exc.error_string})"
            ) from None
        except (RuntimeError, TypeError, EOFError) as exc:
            raise ValueError(f"{where}: could not decode the audio: {exc}") from None
        if frames.shape[0] == 0:
            raise ValueError(f"{where}: the file holds no audio samples")
        mono = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
        return resample(mono, rate)

    def probabilities(self, session: Session, audio: np.ndarray) -> list[float]:
        """Speech probability of each 512-sample window, the model's state carried along."""
        state = np.zeros((2, 1, 128), np.float32)
        extra = {"sr": np.array(SAMPLE_RATE, np.int64)} if self._takes_sr else {}
        padded = np.zeros(-(-audio.size // WINDOW) * WINDOW + CONTEXT, np.float32)
        padded[CONTEXT : CONTEXT + audio.size] = audio
        probs: list[float] = []
        for start in range(0, padded.size - CONTEXT, WINDOW):
            chunk = padded[None, start : start + CONTEXT + WINDOW]
            out = session.infer({"input": chunk, "state": state, **extra}, list(_MODEL_OUTPUTS))
            probs.append(float(out["output"].reshape(-1)[0]))
            state = out["stateN"]
        return probs

    def run(self, session: Session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = media_items(require(inputs, AUDIO_INPUT), AUDIO_INPUT)
        if len(files) != 1:
            raise ValueError(f"input {AUDIO_INPUT} must hold one file, got {len(files)}")
        audio = self.decode(files[0])
        probs = self.probabilities(session, audio)
        spans = speech_timestamps(probs, self._cfg, audio.size)
        segments = np.array(spans, np.float32).reshape(-1, 2) / np.float32(SAMPLE_RATE)
        return {"segments": segments}


def warmup_inputs() -> dict[str, np.ndarray]:
    """What a silero model warms up on when the manifest gives no health inputs: one window
    with its context at 16 kHz. The synthetic warm-up's [1, 1] input is too short for the
    model's reflect padding, and its `sr` of 0 picks the 8 kHz branch. (Exports without
    `sr` leave it out: see runtimes.selection.WarmupFeed.)"""
    return {"input": np.zeros((1, CONTEXT + WINDOW), np.float32),
            "sr": np.array(SAMPLE_RATE, np.int64)}


def build(
    settings: Mapping[str, Any], model_dir: Path | None, session: Session
) -> VoiceActivityDetection:
    return VoiceActivityDetection(parse_settings(VadSettings, settings, TASK), session)
