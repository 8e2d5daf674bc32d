"""The health gate: what a loaded, warmed-up model version must show before it serves.

Always: an inference on the warm-up inputs (the manifest's `health.inputs` laid over
synthetic ones, as `runtimes.selection` warms up with them) succeeds and every
floating-point output is finite. With `health.expected`: the outputs match within
`rtol`/`atol`. With `health.max_latency_ms`: the median of a few timed inferences on
the same inputs stays within it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeinfer.contract.manifest import Health, HealthTensor
from edgeinfer.runtimes.base import Session, check_request, make_sample_inputs, one_line
from edgeinfer.runtimes.datatypes import from_numpy_dtype, to_numpy_dtype

LATENCY_RUNS = 5


class HealthError(Exception):
    """A model version that must not serve; the message says which check failed and how."""


@dataclass(frozen=True)
class HealthReport:
    latency_ms: float | None  # the median measured against max_latency_ms, if one was set


def to_array(tensor: HealthTensor) -> np.ndarray[Any, Any]:
    """The numpy array of a manifest tensor (data flat or nested, row-major)."""
    flat = _flatten(tensor.data)
    dtype = to_numpy_dtype(tensor.datatype)
    if tensor.datatype == "BYTES":
        arr = np.array([v.encode() if isinstance(v, str) else bytes(v) for v in flat], dtype=object)
    else:
        arr = np.asarray(flat, dtype=dtype)
    return arr.reshape(tensor.shape)


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


def sample_inputs(health: Health | None) -> dict[str, np.ndarray[Any, Any]] | None:
    """The manifest's health inputs as arrays, for the warm-up; None without any.

    Raises HealthError when the data cannot be had as the datatype it names.
    """
    if health is None or not health.inputs:
        return None
    try:
        return {t.name: to_array(t) for t in health.inputs}
    except (ValueError, TypeError, OverflowError) as exc:
        raise HealthError(f"health.inputs cannot be read: {one_line(exc)}") from None


def check(session: Session, health: Health | None, *, check_latency: bool = True) -> HealthReport:
    """Run one warm-up inference on `session` and judge it; raises HealthError."""
    feed = make_sample_inputs(session.inputs)
    given = sample_inputs(health)
    if given:
        feed.update(given)
    try:
        check_request(session.inputs, session.outputs, feed, None)
    except ValueError as exc:
        raise HealthError(f"health.inputs do not fit the model: {exc}") from None
    try:
        outputs = session.infer(feed)
    except Exception as exc:
        raise HealthError(f"inference on the warm-up inputs failed: {one_line(exc)}") from None
    return judge(session, feed, outputs, health, check_latency=check_latency)


def judge(
    session: Session,
    feed: Mapping[str, np.ndarray[Any, Any]],
    outputs: Mapping[str, np.ndarray[Any, Any]],
    health: Health | None,
    *,
    check_latency: bool = True,
) -> HealthReport:
    """Judge the outputs of a warm-up run on `feed`; raises HealthError with the reason.

    Fits `runtimes.selection.load_first_workable(check=...)`: the warm-up's own outputs
    are judged, so only a latency budget costs inferences of its own.
    """
    source = "the health inputs" if health is not None and health.inputs else (
        "the synthetic warm-up inputs"
    )
    try:
        check_request(session.inputs, session.outputs, feed, None)
    except ValueError as exc:
        raise HealthError(f"health.inputs do not fit the model: {exc}") from None
    _check_finite(outputs, source)
    if health is not None and health.expected:
        _check_expected(outputs, health)
    latency = None
    if check_latency and health is not None and health.max_latency_ms is not None:
        latency = _check_latency(session, feed, health.max_latency_ms, source)
    return HealthReport(latency)


def _check_finite(outputs: Mapping[str, np.ndarray[Any, Any]], source: str) -> None:
    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fc":
            continue
        nan = int(np.count_nonzero(np.isnan(arr)))
        inf = int(np.count_nonzero(np.isinf(arr)))
        if nan or inf:
            raise HealthError(
                f"output {name!r} has {nan} NaN and {inf} infinite value(s) of {arr.size} "
                f"on {source}"
            )


def _check_expected(outputs: Mapping[str, np.ndarray[Any, Any]], health: Health) -> None:
    for want in health.expected:
        if want.name not in outputs:
            raise HealthError(
                f"health.expected names output {want.name!r}; the model gives "
                f"{', '.join(outputs) or 'none'}"
            )
        actual = np.asarray(outputs[want.name])
        try:
            expected = to_array(want)
        except (ValueError, TypeError, OverflowError) as exc:
            raise HealthError(f"health.expected {want.name!r} cannot be read: {one_line(exc)}") from None
        if list(actual.shape) != list(want.shape):
            raise HealthError(
                f"output {want.name!r} has shape {list(actual.shape)}, health.expected says "
                f"{want.shape}"
            )
        got_type = from_numpy_dtype(actual.dtype)
        if got_type != want.datatype:
            raise HealthError(
                f"output {want.name!r} is {got_type}, health.expected says {want.datatype}"
            )
        if actual.dtype.kind in "fc":
            close = np.isclose(actual, expected, rtol=health.rtol, atol=health.atol)
            if not bool(close.all()):
                bad = int(close.size - np.count_nonzero(close))
                worst = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
                raise HealthError(
                    f"output {want.name!r} differs from health.expected: {bad} of {close.size} "
                    f"value(s) outside rtol={health.rtol:g} atol={health.atol:g} "
                    f"(largest difference {worst:.6g})"
                )
        elif not np.array_equal(actual, expected):
            bad = int(np.count_nonzero(actual != expected))
            raise HealthError(
                f"output {want.name!r} differs from health.expected in {bad} of {actual.size} value(s)"
            )


def _check_latency(
    session: Session,
    feed: Mapping[str, np.ndarray[Any, Any]],
    budget_ms: float,
    source: str,
) -> float:
    """The median of up to LATENCY_RUNS timed runs; stops once the verdict is certain."""
    times: list[float] = []
    need = LATENCY_RUNS // 2 + 1
    while len(times) < LATENCY_RUNS:
        started = time.perf_counter()
        try:
            session.infer(feed)
        except Exception as exc:
            raise HealthError(f"inference on {source} failed: {one_line(exc)}") from None
        took = (time.perf_counter() - started) * 1000.0
        times.append(took)
        over = sum(t > budget_ms for t in times)
        # One run 20x over budget settles it: a slow model is not run 5 times.
        if over >= need or len(times) - over >= need or took > budget_ms * 20:
            break
    median = statistics.median(times)
    if median > budget_ms:
        raise HealthError(
            f"inference on {source} takes {median:.2f} ms (median of {len(times)} run(s)), "
            f"over health.max_latency_ms {budget_ms:g}"
        )
    return median
