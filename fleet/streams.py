"""Iterators over jobs answered by several responses (streamed outputs).

A streaming job is answered by responses with `"parameters": {"sequence_end": false}`, each
carrying the job's Correlation Data, until the last one, which says `true`. A response
without `sequence_end` is final too, so a model that does not stream gives a stream of one.
An error response is always final: the iterator raises its typed `InferenceError`.

The client's worker thread feeds these objects (`_part` for each non-final response, `_done`
with the job's future once the final one, an error, a timeout or a refusal settled it); the
consumer iterates on its own thread (`ResponseStream`) or event loop (`AsyncResponseStream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from edgeinfer.fleet.oip import InferResult

__all__ = ["AsyncResponseStream", "ResponseStream", "StreamBase", "is_final"]

# Queue items: ("part", InferResult) or ("end", the job's settled future).
_Item = tuple[str, Any]


def is_held(doc: dict[str, Any]) -> bool:
    """An UNAVAILABLE with `parameters.held: true`: the agent could not accept the job yet
    (its state disk was full) but holds it, and its real answer follows (docs/protocol.md)."""
    params = doc.get("parameters")
    return "error" in doc and isinstance(params, dict) and params.get("held") is True


def is_final(doc: dict[str, Any]) -> bool:
    """Whether a response ends its job: an error that is not `held`, or anything but
    `sequence_end: false`."""
    if "error" in doc:
        return not is_held(doc)
    params = doc.get("parameters")
    return not (isinstance(params, dict) and params.get("sequence_end") is False)


class StreamBase(ABC):
    """What the client's worker feeds; `ResponseStream` and `AsyncResponseStream` consume it."""

    def __init__(self, job_id: str, correlation: bytes, timeout: float) -> None:
        self.job_id = job_id
        # Every response of the job carries this Correlation Data; it routes them here.
        self.correlation = correlation
        # Longest wait for the next response (the first one included), in seconds.
        self.timeout = timeout
        self.responses = 0  # responses yielded so far
        self._cancel: Callable[[], None] = lambda: None
        self._finished = False  # the final response (or the error) was handed out
        self._closed = False

    def _bind(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel

    # Worker thread, never blocking: a non-final response; the job's future once settled.
    @abstractmethod
    def _part(self, result: InferResult) -> None: ...

    @abstractmethod
    def _done(self, fut: Future[InferResult]) -> None: ...

    def _next_item(self, kind: str, value: Any) -> InferResult:
        if kind == "part":
            self.responses += 1
            return value  # type: ignore[no-any-return]
        self._finished = True
        fut: Future[InferResult] = value
        result = fut.result()  # raises the job's error, timeout or refusal
        self.responses += 1
        return result

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._finished:
                self._cancel()  # later responses of the job are ignored


class ResponseStream(StreamBase):
    """The responses of one streamed job, in order: `for result in client.stream(...)`.

    Each item is an `InferResult`; the last one is the response that said
    `sequence_end: true`. Raises the job's typed error, `TimeoutError` when no response
    came within `timeout` seconds of the previous one, or `BrokerError`. `close()` (or
    leaving a `with` block) stops listening; responses still to come are dropped.
    """

    def __init__(self, job_id: str, correlation: bytes, timeout: float) -> None:
        super().__init__(job_id, correlation, timeout)
        self._q: queue.SimpleQueue[_Item] = queue.SimpleQueue()

    # Worker thread: never blocks.
    def _part(self, result: InferResult) -> None:
        self._q.put(("part", result))

    def _done(self, fut: Future[InferResult]) -> None:
        self._q.put(("end", fut))

    def __iter__(self) -> Iterator[InferResult]:
        return self

    def __next__(self) -> InferResult:
        if self._finished or self._closed:
            raise StopIteration
        try:
            # The client fails the job at `timeout`; the margin only guards a stuck worker.
            kind, value = self._q.get(timeout=self.timeout + 5.0)
        except queue.Empty:
            self.close()
            raise TimeoutError(
                f"job {self.job_id}: no response within {self.timeout:g}s"
            ) from None
        return self._next_item(kind, value)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncResponseStream(StreamBase):
    """The responses of one streamed job for asyncio: `async for result in client.stream(...)`.

    As `ResponseStream`; the worker thread hands responses to the event loop with
    `call_soon_threadsafe`, so waiting for the next one never blocks the loop.
    """

    def __init__(self, job_id: str, correlation: bytes, timeout: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(job_id, correlation, timeout)
        self._loop = loop
        self._q: asyncio.Queue[_Item] = asyncio.Queue()

    # Worker thread: hand over to the loop, never touch the asyncio queue directly.
    def _put(self, item: _Item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._q.put_nowait, item)

    def _part(self, result: InferResult) -> None:
        self._put(("part", result))

    def _done(self, fut: Future[InferResult]) -> None:
        self._put(("end", fut))

    def __aiter__(self) -> AsyncIterator[InferResult]:
        return self

    async def __anext__(self) -> InferResult:
        if self._finished or self._closed:
            raise StopAsyncIteration
        try:
            kind, value = await asyncio.wait_for(self._q.get(), self.timeout + 5.0)
        except TimeoutError:
            self._close()
            raise TimeoutError(
                f"job {self.job_id}: no response within {self.timeout:g}s"
            ) from None
        return self._next_item(kind, value)

    async def aclose(self) -> None:
        self._close()

    def close(self) -> None:
        self._close()

    async def __aenter__(self) -> AsyncResponseStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._close()
