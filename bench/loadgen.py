"""Closed-loop load over MQTT with the job client SDK: N jobs in flight, each answer sends
the next one.

Every target (the agent, the transport echo, the naive baseline) is driven by the same code:
one `fleet.client.InferenceClient`, jobs published with `publish_raw` from payloads encoded
once up front (only the job id changes per job, so the agent's de-duplication never answers
from a stored result), answers read as the SDK reads them (the JSON header decoded, the
binary tail split off). Latency is publish-to-answer on the client's monotonic clock.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY, encode_request

_ID_WIDTH = 12
_ID_STEM = "bench-"
# Job ids must never repeat within a run: the agent answers a job id it has seen (within
# its de-duplication window) from the stored answer, without running it. A random run tag
# and one counter for every loop of this process keep them unique.
_RUN_TAG = os.urandom(2).hex()
_SEQ = itertools.count()


def percentiles_ms(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(latencies_s) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4),
            "p99_ms": round(float(p99), 4), "mean_ms": round(float(arr.mean()), 4)}


@dataclass(frozen=True)
class Template:
    """A request payload encoded once; `payload()` gives a copy with a unique job id."""

    topic: str
    head: bytes
    tail: bytes
    user_properties: tuple[tuple[str, str], ...]

    def payload(self, seq: int | None = None) -> bytes:
        """The request with job id `bench-<run tag><seq>`, by default the next unique one."""
        n = next(_SEQ) if seq is None else seq
        return self.head + f"{_RUN_TAG}{n % 10**8:08d}".encode() + self.tail

    @property
    def size(self) -> int:
        return len(self.head) + _ID_WIDTH + len(self.tail)


def oip_template(topic: str, model: str, inputs: Mapping[str, np.ndarray[Any, Any]],
                 *, binary: bool) -> Template:
    """An OIP v2 request as `fleet.oip.encode_request` (the SDK's encoder) makes it."""
    placeholder = _ID_STEM + "0" * _ID_WIDTH
    body, header_length = encode_request(placeholder, model, inputs, binary=binary)
    return split_template(topic, body, placeholder, header_length)


def split_template(topic: str, body: bytes, placeholder: str,
                   header_length: int | None = None) -> Template:
    """Cut `body` around the digits of `placeholder` (its first occurrence)."""
    at = body.index(placeholder.encode()) + len(_ID_STEM)
    props = ((HEADER_LENGTH_PROPERTY, str(header_length)),) if header_length is not None else ()
    return Template(topic, body[:at], body[at + _ID_WIDTH:], props)


@dataclass
class Point:
    """One closed-loop measurement at a fixed number of jobs in flight."""

    concurrency: int
    seconds: float
    completed: int
    errors: int
    throughput: float  # answers per second inside the measuring window
    latency: dict[str, float | None]
    error_sample: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": self.concurrency, "seconds": round(self.seconds, 3),
               "completed": self.completed, "errors": self.errors,
               "throughput": round(self.throughput, 2), **self.latency}
        if self.error_sample:
            out["error_sample"] = self.error_sample
        out.update(self.extra)
        return out


def answer_error(doc: dict[str, Any]) -> str | None:
    """The error of an OIP error response (or of a naive baseline's), else None."""
    if "error" in doc:
        params = doc.get("parameters") or {}
        code = params.get("code") if isinstance(params, dict) else None
        return f"{code}: {doc['error']}"
    return None


class ClosedLoop:
    """Keeps `concurrency` jobs of `template` in flight on `client` until stopped."""

    def __init__(self, client: InferenceClient, template: Template, concurrency: int,
                 *, timeout_s: float = 60.0,
                 check: Callable[[dict[str, Any]], str | None] = answer_error) -> None:
        self._client = client
        self._template = template
        self._concurrency = concurrency
        self._timeout = timeout_s
        self._check = check
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self._outstanding = 0
        # (done time, latency s, error or None) of every answer
        self.records: list[tuple[float, float, str | None]] = []
        # the agent's own account of each answer: (done time, infer_ms, queue_ms)
        self.agent_times: list[tuple[float, float, float]] = []

    def start(self) -> None:
        for _ in range(self._concurrency):
            self._send()

    def _send(self) -> None:
        seq = next(self._seq)
        payload = self._template.payload()
        with self._lock:
            if self._stop:
                return
            self._outstanding += 1
        started = time.perf_counter()
        try:
            fut = self._client.publish_raw(
                self._template.topic, payload, job_id=f"{seq}", timeout=self._timeout,
                user_properties=self._template.user_properties,
            )
        except Exception as exc:
            self._finish(started, f"publish failed: {exc}", resend=False)
            return
        fut.add_done_callback(lambda f: self._done(f, started))

    def _done(self, fut: Future[dict[str, Any]], started: float) -> None:
        exc = fut.exception()
        if exc is not None:
            error: str | None = f"{type(exc).__name__}: {exc}"
        else:
            doc = fut.result()
            error = self._check(doc)
            params = doc.get("parameters")
            if error is None and isinstance(params, dict) and "infer_ms" in params:
                with self._lock:
                    self.agent_times.append((time.perf_counter(), float(params["infer_ms"]),
                                             float(params.get("queue_ms") or 0.0)))
        self._finish(started, error, resend=True)

    def _finish(self, started: float, error: str | None, *, resend: bool) -> None:
        now = time.perf_counter()
        with self._cond:
            self.records.append((now, now - started, error))
            self._outstanding -= 1
            stopping = self._stop
            self._cond.notify_all()
        if resend and not stopping:
            self._send()

    def count_since(self, t0: float) -> int:
        with self._lock:
            return sum(1 for done, _, _ in self.records if done >= t0)

    def stop(self, wait_s: float) -> int:
        """Send no more; wait up to `wait_s` for the jobs in flight. Returns those left."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._stop = True
            while self._outstanding > 0 and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._outstanding


def measure(client: InferenceClient, template: Template, concurrency: int, *,
            warmup_s: float, measure_s: float, max_s: float,
            min_answers: int | None = None, timeout_s: float = 60.0,
            check: Callable[[dict[str, Any]], str | None] = answer_error,
            on_window: Callable[[], None] | None = None,
            on_window_end: Callable[[], None] | None = None) -> Point:
    """Closed loop at `concurrency`: a warm-up (at least `warmup_s` and one answer per slot),
    then a window of at least `measure_s` holding at least `min_answers` answers (default
    2 x concurrency), cut short at `max_s` seconds in all. Answers inside the window count.
    `on_window` runs once the window opens (e.g. to start a profiler), `on_window_end` as it
    closes, before the jobs still in flight are drained."""
    want = min_answers if min_answers is not None else 2 * concurrency
    loop = ClosedLoop(client, template, concurrency, timeout_s=timeout_s, check=check)
    begin = time.perf_counter()
    hard_end = begin + max_s
    loop.start()
    while time.perf_counter() < hard_end and (
        time.perf_counter() - begin < warmup_s or loop.count_since(begin) < concurrency
    ):
        time.sleep(0.01)
    window_start = time.perf_counter()
    if on_window is not None:
        on_window()
    window_end = max(window_start + measure_s, window_start + 0.05)
    while True:
        now = time.perf_counter()
        if now >= hard_end and now >= window_start + 0.05:
            break
        if now >= window_end and loop.count_since(window_start) >= want:
            break
        time.sleep(0.01)
    window_end = time.perf_counter()
    if on_window_end is not None:
        on_window_end()
    left = loop.stop(wait_s=timeout_s)
    inside = [(lat, err) for done, lat, err in loop.records if window_start <= done <= window_end]
    ok = [lat for lat, err in inside if err is None]
    errors = [err for _, err in inside if err is not None]
    seconds = window_end - window_start
    point = Point(
        concurrency=concurrency, seconds=seconds, completed=len(ok), errors=len(errors),
        throughput=len(ok) / seconds if seconds > 0 else 0.0, latency=percentiles_ms(ok),
        error_sample=errors[0] if errors else None,
    )
    if left:
        point.extra["unanswered_at_stop"] = left
    agent = [(i, q) for done, i, q in loop.agent_times if window_start <= done <= window_end]
    if agent:
        # What the agent reports in each answer: time in the runtime and waiting before it.
        point.extra["agent_infer_ms_p50"] = round(float(np.median([i for i, _ in agent])), 3)
        point.extra["agent_queue_ms_p50"] = round(float(np.median([q for _, q in agent])), 3)
    return point
