"""Runtime auto-tuning: load a model on every workable runtime and precision, keep the
fastest whose outputs agree with an f32 reference.

Candidates are those of `selection.DEFAULT_PREFERENCE` on this hardware (CUDA GPUs,
OpenVINO devices, ONNX Runtime CPU), plus OpenVINO CPU in bf16 where the CPU has
AVX512-BF16 or AMX-BF16. The reference is ONNX Runtime CPU (f32), or the first candidate
that loads when it does not. Each candidate is loaded, warmed up on the same inputs (the
manifest's health inputs laid over synthetic ones), judged by the caller's `check` (the
health gate), compared with the reference within a tolerance, and timed: the median of up to
`TIMED_RUNS` runs, within its share of the tuning budget. The fastest that agrees serves;
the others that agree, fastest first, are its failover order.

The choice is cached in a JSON file (runtimes/autotune_cache.py) per (model sha256,
candidate set, hardware fingerprint, tolerance, threads): a restart loads the chosen
candidate directly.

With an `Int8Plan` (`quantize: int8`, runtimes/quantize.py) the quantized model is two more
candidates, ONNX Runtime CPU and OpenVINO CPU in int8, judged not by the warm-up's
tolerance but on the calibration set against the reference (quantize.judge).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgeinfer.runtimes.autotune_cache import AutotuneCache, hardware_fingerprint
from edgeinfer.runtimes.backends import get_backend
from edgeinfer.runtimes.base import LoadOptions, RuntimeLoadError, Session, one_line
from edgeinfer.runtimes.hardware import HardwareInfo
from edgeinfer.runtimes.quantize import Int8Plan, judge
from edgeinfer.runtimes.selection import (
    Attempt,
    NoRuntimeError,
    WarmupCheck,
    is_auto,
    load_first_workable,
    plan,
    warm_up,
)

log = logging.getLogger(__name__)

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
TIMED_RUNS = 30  # at most, per candidate
MIN_TIMED_RUNS = 3  # at least, even past the budget, so every figure is a median


@dataclass(frozen=True)
class Tolerance:
    """numpy.isclose: |actual - reference| <= atol + rtol * |reference|."""

    rtol: float
    atol: float


# Without a manifest `health` tolerance: f32 candidates as the health gate's defaults; bf16
# has an 8-bit mantissa (~4e-3 relative per op), so it gets a looser default.
DEFAULT_F32_TOLERANCE = Tolerance(rtol=1e-3, atol=1e-5)
DEFAULT_BF16_TOLERANCE = Tolerance(rtol=2e-2, atol=1e-2)


def tolerance_for(precision: str, given: Tolerance | None) -> Tolerance:
    """The manifest's tolerance for every candidate when it gives one, else the default."""
    if given is not None:
        return given
    return DEFAULT_BF16_TOLERANCE if precision == "bf16" else DEFAULT_F32_TOLERANCE


@dataclass(frozen=True)
class Choice:
    runtime: str
    device: str
    precision: str = "f32"

    @property
    def label(self) -> str:
        return f"{self.runtime}/{self.device}/{self.precision}"


@dataclass
class CandidateReport:
    """One candidate's figures, as reported."""

    runtime: str
    device: str
    precision: str
    ok: bool  # loaded, warmed up and passed the check
    reason: str  # why not ok, or why it does not agree; "" otherwise
    p50_ms: float | None = None  # median of the timed runs (agreeing candidates only)
    agrees: bool | None = None  # with the reference; None when not compared
    runs: int = 0
    agreement: float | None = None  # int8 only (quantize.judge)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Tuned:
    """The outcome of `choose`: the serving session and what led to it."""

    session: Session
    choice: Choice
    attempts: list[Attempt]  # failures first, the winner last (as selection.Loaded)
    fallbacks: list[Choice]  # the next candidates for failover, in order
    candidates: list[CandidateReport] = field(default_factory=list)  # auto only
    tuned: bool = False  # chosen by auto-tuning (else: a pinned preference list)
    cached: bool = False  # the choice came from the cache, nothing was measured now
    tuning_s: float | None = None  # time the (possibly cached) tuning took
    reference: str | None = None  # the reference candidate's label

    def summary(self) -> dict[str, Any] | None:
        if not self.tuned:
            return None
        return {"cached": self.cached, "tuning_s": self.tuning_s, "reference": self.reference}


def has_bf16(hw: HardwareInfo) -> bool:
    return any(flag in hw.cpu_flags for flag in BF16_FLAGS)


def candidate_choices(hw: HardwareInfo, int8: bool = False) -> tuple[list[Choice], list[Attempt]]:
    """Everything auto-tuning tries here, reference first, and what it skips with why."""
    candidates, skipped = plan(None, hw)
    choices: list[Choice] = []
    for c in candidates:
        choices.append(Choice(c.runtime, c.device))
        if c.runtime == "openvino" and c.device == "CPU" and has_bf16(hw):
            choices.append(Choice("openvino", "CPU", "bf16"))
    if int8:  # the QDQ model on the CPU runtimes, after every f32 and bf16 candidate
        choices += [Choice(c.runtime, "CPU", "int8") for c in candidates
                    if c.device == "CPU" and c.runtime in ("onnxruntime", "openvino")]
    reference = Choice("onnxruntime", "CPU")
    if reference in choices:
        choices.remove(reference)
        choices.insert(0, reference)
    return choices, skipped


def cache_key(sha256: str, choices: Sequence[Choice], hw: HardwareInfo,
              tolerance: Tolerance | None, threads: int, instances: int = 1,
              int8: Int8Plan | None = None) -> str:
    runtimes = ",".join(c.label for c in choices)
    tol = "default" if tolerance is None else f"{tolerance.rtol!r}/{tolerance.atol!r}"
    key = f"{sha256}|{runtimes}|{hardware_fingerprint(hw)}|tol={tol}|threads={threads}"
    if int8 is not None:
        key += f"|int8={int8.key}/{int8.min_agreement!r}/{int8.classifier}"
    return key if instances == 1 else f"{key}|instances={instances}"


# --- loading, comparing, timing -------------------------------------------------------


@dataclass
class _Warm:
    session: Session
    feed: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def load_choice(
    path: Path,
    choice: Choice,
    options: LoadOptions,
    sample_inputs: Mapping[str, np.ndarray] | None,
    check: WarmupCheck | None,
    int8_path: Path | None = None,
) -> _Warm | str:
    """Load, warm up and judge one candidate: the warmed session, or why it could not be had.
    An int8 choice loads `int8_path`, the quantized model, in f32 (its int8 is in the graph)."""
    backend = get_backend(choice.runtime)
    precision = choice.precision
    if precision == "int8":
        if int8_path is None:
            return "int8: no quantized model"
        path, precision = int8_path, "f32"
    opts = LoadOptions(threads=options.threads, precision=precision,
                       instances=options.instances)
    try:
        session = backend.load(path, choice.device, opts)
    except RuntimeLoadError as exc:
        return str(exc)
    except Exception as exc:  # a backend bug must not stop the others; keep its type
        return f"{type(exc).__name__}: {one_line(exc)}"
    try:
        feed, outputs = warm_up(session, sample_inputs, check)
    except Exception as exc:
        session.close()
        return f"warm-up failed: {one_line(exc)}"
    return _Warm(session, feed, outputs)


def disagreement(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], tol: Tolerance
) -> str | None:
    """Why `outputs` do not agree with `reference`, or None when they do.

    Floating-point outputs within `tol` (numpy.isclose, NaN never equal); all others exact.
    """
    for name, ref in reference.items():
        if name not in outputs:
            return f"output {name!r} is missing"
        got = np.asarray(outputs[name])
        want = np.asarray(ref)
        if got.shape != want.shape:
            return f"output {name!r} has shape {list(got.shape)}, the reference {list(want.shape)}"
        if want.dtype.kind in "fc" and got.dtype.kind in "fc":
            close = np.isclose(got.astype(np.float64), want.astype(np.float64),
                               rtol=tol.rtol, atol=tol.atol)
            bad = int(close.size - np.count_nonzero(close))
            if bad:
                diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
                worst = float(np.nanmax(diff)) if np.isfinite(diff).any() else float("nan")
                return (f"output {name!r}: {bad} of {close.size} values beyond rtol={tol.rtol:g}, "
                        f"atol={tol.atol:g} (max abs diff {worst:.3g})")
        elif got.dtype != want.dtype:
            return f"output {name!r} is {got.dtype}, the reference {want.dtype}"
        elif not np.array_equal(got, want):
            bad = int(np.count_nonzero(got != want))
            return f"output {name!r}: {bad} of {want.size} values differ (compared exactly)"
    return None


def time_runs(session: Session, feed: Mapping[str, np.ndarray], budget_s: float) -> list[float]:
    """Milliseconds of up to TIMED_RUNS inferences, at least MIN_TIMED_RUNS, within budget_s."""
    times: list[float] = []
    stop = time.monotonic() + max(0.0, budget_s)
    while len(times) < TIMED_RUNS and (len(times) < MIN_TIMED_RUNS or time.monotonic() < stop):
        started = time.perf_counter()
        session.infer(feed)
        times.append((time.perf_counter() - started) * 1000.0)
    return times


# --- choosing -------------------------------------------------------------------------


def choose(
    path: Path,
    prefer: Sequence[str] | None,
    hw: HardwareInfo,
    options: LoadOptions,
    *,
    sha256: str,
    budget_s: float,
    sample_inputs: Mapping[str, np.ndarray] | None = None,
    check: WarmupCheck | None = None,
    tolerance: Tolerance | None = None,
    cache: AutotuneCache | None = None,
    int8: Int8Plan | None = None,
) -> Tuned:
    """Serve `path` on the runtime `prefer` asks for: auto-tuned for ["auto"], else the
    first workable entry of the pinned list (selection.load_first_workable).

    Raises NoRuntimeError when nothing works, ValueError for a bad preference list.
    """
    if is_auto(prefer):
        return autotune(path, hw, options, sha256=sha256, budget_s=budget_s,
                        sample_inputs=sample_inputs, check=check, tolerance=tolerance,
                        cache=cache, int8=int8)
    loaded = load_first_workable(path, prefer, hw, options, warmup=True,
                                 sample_inputs=sample_inputs, check=check)
    session = loaded.session
    candidates, _ = plan(prefer, hw)
    after = [c for c in candidates if (c.runtime, c.device) != (session.runtime, session.device)]
    tried = {(a.runtime, a.device) for a in loaded.attempts}
    # Failover goes down the list: candidates not tried yet, then those that failed now.
    fallbacks = [Choice(c.runtime, c.device) for c in after if (c.runtime, c.device) not in tried]
    fallbacks += [Choice(c.runtime, c.device) for c in after if (c.runtime, c.device) in tried]
    return Tuned(session, Choice(session.runtime, session.device), loaded.attempts, fallbacks)


def autotune(
    path: Path,
    hw: HardwareInfo,
    options: LoadOptions,
    *,
    sha256: str,
    budget_s: float,
    sample_inputs: Mapping[str, np.ndarray] | None = None,
    check: WarmupCheck | None = None,
    tolerance: Tolerance | None = None,
    cache: AutotuneCache | None = None,
    int8: Int8Plan | None = None,
) -> Tuned:
    choices, skipped = candidate_choices(hw, int8 is not None)
    key = cache_key(sha256, choices, hw, tolerance, options.threads, options.instances, int8)
    int8_path = None if int8 is None else int8.path
    if cache is not None and (entry := cache.get(key)) is not None:
        hit = _from_cache(path, entry, options, sample_inputs, check, int8_path)
        if hit is not None:
            return hit
    started = time.monotonic()
    deadline = started + budget_s
    attempts: list[Attempt] = list(skipped)
    reports = [CandidateReport(a.runtime, a.device, "f32", ok=False, reason=a.reason)
               for a in skipped]
    reference: _Warm | None = None
    ref_label: str | None = None
    best: tuple[float, Choice, _Warm] | None = None
    agreeing: list[tuple[float, Choice]] = []
    for index, choice in enumerate(choices):
        left = deadline - time.monotonic()
        if reference is not None and left <= 0:
            reason = f"not tried: the tuning budget of {budget_s:g} s (runtime.autotune_budget_s) was spent"
            reports.append(CandidateReport(choice.runtime, choice.device, choice.precision,
                                           ok=False, reason=reason))
            continue
        warm = load_choice(path, choice, options, sample_inputs, check, int8_path)
        if isinstance(warm, str) and choice.precision == "int8" and int8 and int8.error:
            warm = int8.error  # quantizing failed: every int8 candidate says why
        if isinstance(warm, str):
            log.info("%s: autotune: %s failed: %s", path.name, choice.label, warm)
            attempts.append(Attempt(choice.runtime, choice.device, ok=False,
                                    reason=_with_precision(choice, warm)))
            reports.append(CandidateReport(choice.runtime, choice.device, choice.precision,
                                           ok=False, reason=warm))
            continue
        report = CandidateReport(choice.runtime, choice.device, choice.precision, ok=True,
                                 reason="")
        reports.append(report)
        if reference is None:
            reference, ref_label = warm, choice.label
            report.agrees = True
        else:
            if choice.precision == "int8" and int8 is not None:
                report.agreement, why = _judge_int8(reference, warm, int8)
            else:
                why = disagreement(warm.outputs, reference.outputs,
                                   tolerance_for(choice.precision, tolerance))
            report.agrees = why is None
            if why is not None:
                report.reason = f"disagrees with the reference {ref_label}: {why}"
                log.info("%s: autotune: %s %s", path.name, choice.label, report.reason)
                attempts.append(Attempt(choice.runtime, choice.device, ok=False,
                                        reason=_with_precision(choice, report.reason)))
                warm.session.close()
                continue
        share = max(0.0, deadline - time.monotonic()) / (len(choices) - index)
        try:
            times = time_runs(warm.session, warm.feed, share)
        except Exception as exc:
            report.ok, report.reason = False, f"timed run failed: {one_line(exc)}"
            attempts.append(Attempt(choice.runtime, choice.device, ok=False,
                                    reason=_with_precision(choice, report.reason)))
            if warm is not reference:
                warm.session.close()
            continue
        report.p50_ms = round(statistics.median(times), 4)
        report.runs = len(times)
        agreeing.append((report.p50_ms, choice))
        if best is None or report.p50_ms < best[0]:
            if best is not None and best[2] is not reference:
                best[2].session.close()
            best = (report.p50_ms, choice, warm)
        elif warm is not reference:
            warm.session.close()
    if reference is not None and (best is None or best[2] is not reference):
        reference.session.close()
    tuning_s = round(time.monotonic() - started, 3)
    if best is None:
        raise NoRuntimeError(path, attempts)
    _, winner, warm = best
    attempts.append(Attempt(winner.runtime, winner.device, ok=True, reason=""))
    fallbacks = [c for _, c in sorted(agreeing, key=lambda pc: pc[0]) if c != winner]
    log.info("%s: autotune chose %s in %.2fs: %s", path.name, winner.label, tuning_s,
             ", ".join(f"{r.runtime}/{r.device}/{r.precision}="
                       + (f"{r.p50_ms}ms" if r.p50_ms is not None else "-") for r in reports))
    tuned = Tuned(warm.session, winner, attempts, fallbacks, reports, tuned=True, cached=False,
                  tuning_s=tuning_s, reference=ref_label)
    if cache is not None:
        cache.put(key, {
            "choice": asdict(winner),
            "fallbacks": [asdict(c) for c in fallbacks],
            "candidates": [r.to_json() for r in reports],
            "attempts": [asdict(a) for a in attempts],
            "tuning_s": tuning_s,
            "reference": ref_label,
            "tuned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })
    return tuned


def _with_precision(choice: Choice, reason: str) -> str:
    return reason if choice.precision == "f32" else f"{choice.precision}: {reason}"


def _judge_int8(reference: _Warm, warm: _Warm, int8: Int8Plan) -> tuple[float | None, str | None]:
    try:
        share, why = judge(reference.session, warm.session, int8)
    except Exception as exc:  # a calibration batch it cannot run: refused, not a crash
        return None, f"failed on the calibration set: {one_line(exc)}"
    return round(share, 4), why


def _from_cache(
    path: Path,
    entry: dict[str, Any],
    options: LoadOptions,
    sample_inputs: Mapping[str, np.ndarray] | None,
    check: WarmupCheck | None,
    int8_path: Path | None = None,
) -> Tuned | None:
    """The cached choice, loaded and warmed up; None (tune again) when it fails now."""
    try:
        winner = Choice(**entry["choice"])
        fallbacks = [Choice(**c) for c in entry["fallbacks"]]
        reports = [CandidateReport(**r) for r in entry["candidates"]]
        attempts = [Attempt(**a) for a in entry["attempts"]]
        tuning_s = float(entry["tuning_s"])
        reference = entry.get("reference")
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s: autotune cache entry unusable (%s); tuning again", path.name, exc)
        return None
    warm = load_choice(path, winner, options, sample_inputs, check, int8_path)
    if isinstance(warm, str):
        log.warning("%s: autotune cache chose %s, which fails now (%s); tuning again",
                    path.name, winner.label, warm)
        return None
    log.info("%s: autotune cache hit: serving on %s without tuning", path.name, winner.label)
    return Tuned(warm.session, winner, attempts, fallbacks, reports, tuned=True, cached=True,
                 tuning_s=tuning_s, reference=str(reference) if reference else None)
