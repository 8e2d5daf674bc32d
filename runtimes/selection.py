"""The one place that decides which runtime and device serve a model.

A model's preference list (default: CUDA, then OpenVINO, then ONNX Runtime on the CPU) is
turned into candidates against the detected hardware; `load_first_workable` loads them in
order, warms the winner up, and falls back down the list when a load or a warm-up fails.
Every skip and failure is kept as an `Attempt` with a reason a person can act on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeinfer.runtimes.backends import KNOWN_RUNTIMES, get_backend
from edgeinfer.runtimes.base import LoadOptions, RuntimeLoadError, Session, make_sample_inputs, one_line
from edgeinfer.runtimes.hardware import HardwareInfo

log = logging.getLogger(__name__)

DEFAULT_PREFERENCE: tuple[str, ...] = ("cuda", "openvino", "onnxruntime")

# The preference entry that asks for auto-tuning (runtimes/autotune.py): every workable
# candidate of DEFAULT_PREFERENCE is loaded, checked and timed, and the fastest that agrees
# serves. It stands alone; here (plan, explain) it reads as DEFAULT_PREFERENCE.
AUTO = "auto"


def is_auto(prefer: Sequence[str] | None) -> bool:
    """True for ["auto"]; ValueError when "auto" is mixed with other entries."""
    entries = [e.strip().lower() for e in prefer or ()]
    if AUTO not in entries:
        return False
    if len(entries) != 1:
        raise ValueError(
            f"preference {', '.join(prefer or ())!r}: {AUTO!r} stands alone (it tries every "
            "runtime); list runtimes instead to pin an order"
        )
    return True


def check_preference(prefer: Sequence[str]) -> None:
    """Raise ValueError for an entry no runtime answers to, or "auto" mixed with others."""
    if not is_auto(prefer):
        for entry in prefer:
            parse_preference(entry)

# Judges a warmed-up session by (session, warm-up inputs, warm-up outputs); raises to refuse
# it on this candidate, which then counts as a failed warm-up (the next candidate is tried).
WarmupCheck = Callable[[Session, Mapping[str, np.ndarray], Mapping[str, np.ndarray]], None]

_DEFAULT_OPTIONS = LoadOptions()


@dataclass(frozen=True)
class Candidate:
    runtime: str
    device: str


@dataclass(frozen=True)
class Attempt:
    runtime: str
    device: str  # "" when skipped before any device was chosen
    ok: bool
    reason: str  # "" when ok, else why it was skipped or failed

    def __str__(self) -> str:
        where = f"{self.runtime}/{self.device}" if self.device else self.runtime
        return f"{where}: {'ok' if self.ok else self.reason}"


@dataclass
class Loaded:
    session: Session
    attempts: list[Attempt] = field(default_factory=list)  # failures first, the winner last


class NoRuntimeError(Exception):
    """No candidate loaded (and warmed up); `attempts` holds every reason."""

    def __init__(self, path: Path, attempts: list[Attempt]) -> None:
        self.attempts = attempts
        reasons = "; ".join(str(a) for a in attempts) or "the preference list is empty"
        super().__init__(f"no workable runtime for {path.name}: {reasons}")


def parse_preference(entry: str) -> tuple[str, str | None]:
    """'openvino:GPU' -> ('openvino', 'GPU'); 'cuda' -> ('cuda', None).

    The device part is matched against the runtime's devices: exactly, as a family
    ('GPU' matches 'GPU.0'), or as an index for cuda ('cuda:1').
    """
    runtime, sep, device = entry.strip().partition(":")
    runtime = runtime.strip().lower()
    if runtime not in KNOWN_RUNTIMES:
        raise ValueError(
            f"unknown runtime {runtime!r} in preference {entry!r}; known runtimes: "
            f"{', '.join(KNOWN_RUNTIMES)} (a device may follow a colon, e.g. openvino:GPU)"
        )
    device = device.strip()
    if sep and not device:
        raise ValueError(f"preference {entry!r} has a colon but names no device")
    return runtime, device or None


def _matches(runtime: str, device: str, wanted: str) -> bool:
    d, w = device.upper(), wanted.upper()
    return d == w or d.startswith(w + ".") or d == f"{runtime}:{wanted}".upper()


def _steps(
    prefer: Sequence[str] | None, hw: HardwareInfo
) -> Iterator[tuple[str, Candidate | Attempt]]:
    """(preference entry, candidate or skip) in preference order, without repeats.

    A generator, so that load_first_workable stops looking at the first winner.
    """
    entries = list(prefer) if prefer else list(DEFAULT_PREFERENCE)
    expanded = [(entry, e) for entry in entries
                for e in (DEFAULT_PREFERENCE if is_auto([entry]) else (entry,))]
    # all errors up front
    parsed = [(entry, *parse_preference(e)) for entry, e in expanded]
    seen: set[Candidate | Attempt] = set()
    for entry, runtime, wanted in parsed:
        backend = get_backend(runtime)
        steps: list[Candidate | Attempt] = []
        reason = backend.unavailable_reason(hw)
        devices = [] if reason else backend.devices(hw)
        if wanted is not None:
            picked = [d for d in devices if _matches(runtime, d, wanted)]
            if not reason and not picked:
                reason = f"no device {wanted} (it has {', '.join(devices) or 'none'})"
            devices = picked
        elif not reason and not devices:
            reason = "no devices"
        if reason:
            steps.append(Attempt(runtime, wanted or "", ok=False, reason=reason))
        steps.extend(Candidate(runtime, d) for d in devices)
        for step in steps:
            if step not in seen:
                seen.add(step)
                yield entry, step


def plan(prefer: Sequence[str] | None, hw: HardwareInfo) -> tuple[list[Candidate], list[Attempt]]:
    """Workable candidates in order, and the entries skipped with their reasons.

    Raises ValueError for an unknown runtime in `prefer`.
    """
    candidates: list[Candidate] = []
    skipped: list[Attempt] = []
    for _entry, step in _steps(prefer, hw):
        if isinstance(step, Candidate):
            candidates.append(step)
        else:
            skipped.append(step)
    return candidates, skipped


class WarmupFeed(dict[str, np.ndarray]):
    """A task's own warm-up inputs (not the manifest's health inputs): names the session
    does not take are left out, as one task's models come in variants (silero's exports
    with and without `sr`). Health inputs with a wrong name still fail the warm-up."""


def warm_up(
    session: Session, sample_inputs: Mapping[str, np.ndarray] | None, check: WarmupCheck | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run the warm-up (sample inputs over synthetic ones) and judge it; (feed, outputs)."""
    feed = make_sample_inputs(session.inputs)
    if isinstance(sample_inputs, WarmupFeed):
        feed.update({k: v for k, v in sample_inputs.items() if k in feed})
    elif sample_inputs:
        feed.update(sample_inputs)
    result = session.infer(feed)
    missing = [s.name for s in session.outputs if s.name not in result]
    if missing:
        raise RuntimeLoadError(f"warm-up returned no {', '.join(missing)}")
    if check is not None:
        check(session, feed, result)
    return feed, result


def _try(
    path: Path,
    candidate: Candidate,
    options: LoadOptions,
    warmup: bool,
    sample_inputs: Mapping[str, np.ndarray] | None,
    check: WarmupCheck | None,
) -> Session | str:
    """The warmed-up session, or the reason it could not be had."""
    backend = get_backend(candidate.runtime)
    try:
        session = backend.load(path, candidate.device, options)
    except RuntimeLoadError as exc:
        return str(exc)
    except Exception as exc:  # a backend bug must not stop the fallback; keep its type
        return f"{type(exc).__name__}: {one_line(exc)}"
    if warmup:
        try:
            warm_up(session, sample_inputs, check)
        except Exception as exc:
            session.close()
            return f"warm-up failed: {one_line(exc)}"
    return session


def load_first_workable(
    path: Path,
    prefer: Sequence[str] | None,
    hw: HardwareInfo,
    options: LoadOptions = _DEFAULT_OPTIONS,
    warmup: bool = True,
    *,
    sample_inputs: Mapping[str, np.ndarray] | None = None,
    check: WarmupCheck | None = None,
) -> Loaded:
    """Load the model on the first candidate that loads and warms up.

    The warm-up runs `make_sample_inputs(session.inputs)`, with any `sample_inputs` laid
    over it: models whose inputs must hold meaningful values or sizes (an audio window of
    512 samples, a sample rate) need them. `check`, when given, judges the warm-up's
    outputs (agent.health: finite, as expected, fast enough); a candidate it refuses is a
    failed warm-up. Raises NoRuntimeError when nothing works, ValueError for an unknown
    runtime in `prefer`.
    """
    attempts: list[Attempt] = []
    for _entry, step in _steps(prefer, hw):
        if isinstance(step, Attempt):
            attempts.append(step)
            continue
        outcome = _try(path, step, options, warmup, sample_inputs, check)
        if isinstance(outcome, str):
            log.info("%s: %s on %s failed: %s", path.name, step.runtime, step.device, outcome)
            attempts.append(Attempt(step.runtime, step.device, ok=False, reason=outcome))
            continue
        attempts.append(Attempt(step.runtime, step.device, ok=True, reason=""))
        log.info("%s: serving on %s/%s", path.name, step.runtime, step.device)
        return Loaded(outcome, attempts)
    raise NoRuntimeError(path, attempts)


def _label(runtime: str, device: str, hw: HardwareInfo) -> str:
    if runtime == "openvino":
        name = hw.openvino_device_name(device)
    elif runtime == "cuda":
        index = device.partition(":")[2]
        name = next((g.name for g in hw.nvidia_gpus if str(g.index) == index), device)
    else:
        name = hw.cpu_model or device
    return device if name == device else f"{device} ({name})"


def explain(prefer: Sequence[str] | None, hw: HardwareInfo) -> list[str]:
    """Lines for `edge-agent doctor`: what each preference entry would get here, and why."""
    entries = list(prefer) if prefer else list(DEFAULT_PREFERENCE)
    lines = [f"preference: {', '.join(entries)}{'' if prefer else ' (default)'}"]
    by_entry: dict[str, list[Candidate | Attempt]] = {}
    for entry, step in _steps(entries, hw):
        by_entry.setdefault(entry, []).append(step)
    first = True
    for entry in dict.fromkeys(entries):
        steps = by_entry.get(entry, [])
        tries = [s for s in steps if isinstance(s, Candidate)]
        skips = [s for s in steps if isinstance(s, Attempt)]
        for skip in skips:
            lines.append(f"  {entry}: skipped: {skip.reason}")
        if tries and is_auto([entry]):
            where = ", ".join(f"{c.runtime} on {_label(c.runtime, c.device, hw)}" for c in tries)
            lines.append(f"  {entry}: loads, checks against ONNX Runtime CPU and times {where} "
                         "(and OpenVINO CPU bf16 where the CPU has it); the fastest that agrees serves")
            first = False
        elif tries:
            where = ", then ".join(_label(c.runtime, c.device, hw) for c in tries)
            verb = "tries first" if first else "falls back to"
            lines.append(f"  {entry}: {verb} {tries[0].runtime} on {where}")
            first = False
        elif not skips:
            lines.append(f"  {entry}: nothing new (covered by an earlier entry)")
    lines.append(
        "  a model that fails to load or warm up on one candidate falls back to the next"
        if not first
        else "  no workable runtime: every model would fail to load"
    )
    return lines
