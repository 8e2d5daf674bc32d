"""The scheduler in process: a real Scheduler, Journal and OutboxPublisher, fakes only at the
runtime seam (a fake Session; for the cancel test a fake streaming pipeline built in place of
the task's own), and no broker: answers are what the outbox hands its publish function.

What a client sees is asserted: one answer per job, its code and text, the order in which
jobs ran, a cancel that stops a running job; and two promises of the job path: a job's
header is parsed once, and failover is told of every run's outcome.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from edgeinfer.agent import protocol, served
from edgeinfer.agent.config import JobsConfig
from edgeinfer.agent.journal import Journal, OutMessage, StoredJob
from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.outbox import OutboxPublisher
from edgeinfer.agent.scheduler import Scheduler
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.contract.manifest import ModelSpec
from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.pipelines.base import StreamingPipeline

REPLY = "edge/v1/reply/c1"
RESULTS = "edge/v1/dev/gw/results"
Array = np.ndarray[Any, Any]


class FakeSession:
    """A runtime session: y = 2x; raises when x holds `fail_on`; waits on `gate` if set."""

    runtime = "fake"
    device = "CPU"
    inputs = [TensorSpec("x", "FP32", (1, 4))]
    outputs = [TensorSpec("y", "FP32", (1, 4))]

    def __init__(self) -> None:
        self.ran: list[float] = []  # the first value of each job's x, in run order
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_on: float | None = None

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str] | None = None
              ) -> dict[str, Array]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        x = inputs["x"]
        self.ran.append(float(x.reshape(-1)[0]))
        if self.fail_on is not None and float(x.reshape(-1)[0]) == self.fail_on:
            raise RuntimeError("the accelerator fell over")
        return {"y": x * 2}

    def close(self) -> None:
        pass


class Observer:
    """A RunObserver standing in for agent/failover.py's FailoverManager."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []
        self.runs: list[tuple[str, int]] = []

    def failed(self, model: ServingModel, exc: BaseException) -> None:
        self.failures.append((model.label, str(exc)))

    def returned(self, model: ServingModel, inputs: Sequence[Mapping[str, Array]],
                 outputs: Sequence[Mapping[str, Array]]) -> None:
        self.runs.append((model.label, len(outputs)))


@dataclass
class _Info:
    mid: int


def _spec(**extra: Any) -> ModelSpec:
    return msgspec.convert({"name": "m", "version": "1", "uri": "file:///m",
                            "sha256": "ab" * 32, "size": 1, **extra}, ModelSpec)


class Stack:
    def __init__(self, tmp: Path, session: Any, *, workers: int = 2,
                 spec: ModelSpec | None = None, journal: Journal | None = None) -> None:
        self.session = session
        self.journal = journal if journal is not None else Journal(tmp / "journal.sqlite3")
        self.published: list[OutMessage] = []
        self.acks: list[int] = []
        self.sent = threading.Condition()
        connected = threading.Event()
        connected.set()
        self.outbox = OutboxPublisher(self.journal, self._publish, connected, lambda: 1 << 20)
        self.registry = ServedModels()
        self.registry.replace([ServingModel(spec or _spec(), session, [])])
        self.observer = Observer()
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            registry=self.registry, metrics=self.metrics, journal=self.journal,
            outbox=self.outbox,
            ack=lambda mid, qos: self.acks.append(mid),
            send_now=lambda topic, payload, corr, props: None,
            results_topic=RESULTS, reply_prefixes=["edge/v1/reply/"],
            cfg=JobsConfig(workers=workers), observer=self.observer,
        )

    def _publish(self, msg: OutMessage) -> _Info:
        with self.sent:
            self.published.append(msg)
            self.sent.notify_all()
        return _Info(msg.seq)

    def answers(self, n: int) -> dict[str, dict[str, Any]]:
        """The first `n` answers' headers, by correlation data."""
        with self.sent:
            assert self.sent.wait_for(lambda: len(self.published) >= n, 10), self.published
            msgs = list(self.published)
        out: dict[str, dict[str, Any]] = {}
        for m in msgs:
            length = int(dict(m.user_props).get("Inference-Header-Content-Length",
                                                len(m.payload)))
            out[(m.correlation or b"").decode()] = json.loads(m.payload[:length])
        return out

    def close(self) -> None:
        self.scheduler.stop(5.0)
        self.journal.close()


def job(n: int, *, header: dict[str, Any] | None = None, expiry_s: int | None = None,
        received: float | None = None, **params: Any) -> Inbound:
    """Job `n`: x = [n, n, n, n] as binary data, correlation data "c<n>"; or `header`
    alone (JSON data only)."""
    body: dict[str, Any] = {"id": f"j{n}", "model_name": "m", "inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32",
         "parameters": {"binary_data_size": 16}}]}
    if params:
        body["parameters"] = params
    if header is not None:
        text = json.dumps(header).encode()
        props: tuple[tuple[str, str], ...] = ()
        payload = text
    else:
        text = json.dumps(body).encode()
        props = (("Inference-Header-Content-Length", str(len(text))),)
        payload = text + np.full((1, 4), n, np.float32).tobytes()
    return Inbound("edge/v1/dev/gw/jobs", payload, 1, False, REPLY, f"c{n}".encode(), props,
                   expiry_s,
                   time.monotonic() if received is None else received, time.time(), n)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, FakeSession())
    yield s
    s.close()


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Every parse of a job's payload, wherever in the agent it is made: the calls of
    protocol's decode_request, peek_meta and peek_id through any agent module's name."""
    calls = {"decode_request": 0, "peek_meta": 0, "peek_id": 0}
    for name in list(calls):
        real = getattr(protocol, name)

        def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return _real(*args)

        for mod_name, module in list(sys.modules.items()):
            if mod_name.startswith("edgeinfer.agent.") and getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, counted)
    return calls


def test_a_good_job_is_admitted_acknowledged_and_answered(stack: Stack) -> None:
    stack.scheduler.start()
    stack.scheduler.submit(job(3))
    answer = stack.answers(1)["c3"]
    assert answer["id"] == "j3" and "error" not in answer
    assert answer["outputs"][0]["name"] == "y"
    assert stack.acks == [3]
    assert stack.scheduler.executed == 1
    deadline = time.monotonic() + 5
    while stack.scheduler.depth() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stack.scheduler.depth() == 0


def test_a_malformed_job_is_answered_invalid_argument_naming_the_problem(stack: Stack) -> None:
    stack.scheduler.start()
    stack.scheduler.submit(job(1, header={"id": "bad1", "model_name": "m", "inputs": "x"}))
    stack.scheduler.submit(job(2, header={"id": "bad2", "inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
    answers = stack.answers(2)
    assert answers["c1"]["id"] == "bad1"
    assert answers["c1"]["parameters"]["code"] == "INVALID_ARGUMENT"
    assert "inputs" in answers["c1"]["error"]
    assert answers["c2"]["parameters"]["code"] == "INVALID_ARGUMENT"
    assert "no model named" in answers["c2"]["error"]
    assert stack.session.ran == []  # neither reached the runtime
    assert sorted(stack.acks) == [1, 2]  # answered, so acknowledged: never delivered again


def test_a_job_past_its_deadline_is_not_run(stack: Stack) -> None:
    stack.scheduler.start()
    # Its 1 s expiry interval ran out while it waited (received 5 s ago).
    stack.scheduler.submit(job(1, expiry_s=1, received=time.monotonic() - 5.0))
    # Sent 60 s ago by the client's clock with a timeout of 1 s.
    stack.scheduler.submit(job(2, timeout_ms=1000, sent_at_ms=(time.time() - 60) * 1000))
    answers = stack.answers(2)
    assert answers["c1"]["parameters"]["code"] == "DEADLINE_EXCEEDED"
    assert answers["c2"]["parameters"]["code"] == "DEADLINE_EXCEEDED"
    assert stack.session.ran == []


def test_waiting_jobs_run_by_priority_then_arrival(tmp_path: Path) -> None:
    s = Stack(tmp_path, FakeSession(), workers=1)
    try:
        s.session.gate = threading.Event()
        s.scheduler.start()
        s.scheduler.submit(job(1))  # takes the only worker, and waits at the gate
        assert s.session.entered.wait(10)
        s.scheduler.submit(job(2, priority=12))
        s.scheduler.submit(job(3, priority=2))
        s.scheduler.submit(job(4))  # the default priority (jobs.default_priority: 10)
        s.scheduler.submit(job(5, priority=2))
        deadline = time.monotonic() + 10
        while s.scheduler.depth() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.session.gate.set()
        s.answers(5)
        assert s.session.ran == [1.0, 3.0, 5.0, 4.0, 2.0]
    finally:
        s.close()


class FakeGeneration(StreamingPipeline):
    """A text generator that writes "x" until it is cancelled (at most 10 s)."""

    task = "text-generation"

    def __init__(self) -> None:
        self.started = threading.Event()

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("text_input", "BYTES", (1,))]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("text_output", "BYTES", (1,)),
                TensorSpec("finish_reason", "BYTES", (1,))]

    def run(self, session: Session, inputs: Mapping[str, Array],
            cancel: threading.Event | None = None) -> dict[str, Array]:
        chunks = list(self.run_stream(session, inputs, cancel))
        return {"text_output": np.array([b"".join(c["text_output"][0] for c in chunks)],
                                        dtype=object),
                "finish_reason": chunks[-1]["finish_reason"]}

    def run_stream(self, session: Session, inputs: Mapping[str, Array],
                   cancel: threading.Event | None = None) -> Iterator[dict[str, Array]]:
        assert cancel is not None
        self.started.set()
        for _ in range(1000):
            if cancel.wait(0.01):
                break
            yield {"text_output": np.array([b"x"], dtype=object),
                   "finish_reason": np.array([b""], dtype=object)}
        yield {"text_output": np.array([b""], dtype=object),
               "finish_reason": np.array([b"cancelled" if cancel.is_set() else b"length"],
                                         dtype=object)}


def test_a_cancel_request_stops_a_running_job(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = FakeGeneration()
    monkeypatch.setattr(served, "build_pipeline", lambda *args: pipeline)
    s = Stack(tmp_path, FakeSession(), spec=_spec(task="text-generation"))
    try:
        s.scheduler.start()
        prompt = {"id": "long", "model_name": "m", "inputs": [
            {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
        s.scheduler.submit(job(1, header=prompt))
        assert pipeline.started.wait(10)
        s.scheduler.submit(job(2, header={"id": "stop", "model_name": "m", "inputs": [],
                                          "parameters": {"cancel": "long"}}))
        s.scheduler.submit(job(3, header={"id": "stop2", "model_name": "m", "inputs": [],
                                          "parameters": {"cancel": "nothing-runs"}}))
        answers = s.answers(3)
        assert answers["c2"]["parameters"] == {"cancel": "long", "found": True}
        assert answers["c3"]["parameters"] == {"cancel": "nothing-runs", "found": False}
        finish = next(o for o in answers["c1"]["outputs"] if o["name"] == "finish_reason")
        assert finish["data"] == ["cancelled"]
    finally:
        s.close()


def test_a_job_header_is_parsed_once_on_every_path(tmp_path: Path,
                                                   parses: dict[str, int]) -> None:
    s = Stack(tmp_path, FakeSession())
    try:
        s.scheduler.start()
        for n in range(1, 5):
            s.scheduler.submit(job(n))
        s.answers(4)
        assert parses == {"decode_request": 4, "peek_meta": 0, "peek_id": 0}
        # A job that fails before it runs (no such model) is answered with its id, unread.
        s.scheduler.submit(job(5, header={"id": "j5", "model_name": "nope", "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}))
        answer = s.answers(5)["c5"]
        assert answer["id"] == "j5" and answer["parameters"]["code"] == "NOT_FOUND"
        # One whose Response Topic is refused: answered on .../results, with its id, unread.
        s.scheduler.submit(dataclasses.replace(job(7), response_topic="elsewhere/#"))
        refused = s.answers(6)["c7"]
        assert refused["id"] == "j7" and "refused" in refused["error"]
        assert s.published[-1].topic == RESULTS
        assert parses == {"decode_request": 6, "peek_meta": 0, "peek_id": 0}
    finally:
        s.close()
    # After a restart: a job the journal holds unanswered is read once, when recovered.
    journal = Journal(tmp_path / "again.sqlite3")
    first = job(6)
    journal.admit([StoredJob(f"id:{REPLY}|j6", first.topic, first.payload, REPLY, b"c6",
                             first.user_properties, None, time.time())])
    s = Stack(tmp_path, FakeSession(), journal=journal)
    try:
        assert s.scheduler.recover() == 1
        s.scheduler.start()
        assert "error" not in s.answers(1)["c6"]
        assert parses == {"decode_request": 7, "peek_meta": 0, "peek_id": 0}
    finally:
        s.close()


def test_a_long_header_is_peeked_at_by_the_intake_and_decoded_by_its_worker(
        stack: Stack, parses: dict[str, int]) -> None:
    data = [0.0, 1.0, 2.0, 3.0]
    pad = "p" * (70 * 1024)  # a header over INTAKE_DECODE_MAX
    stack.scheduler.start()
    stack.scheduler.submit(job(1, header={"id": "big", "model_name": "m", "inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": data}],
        "parameters": {"note": pad}}))
    assert "error" not in stack.answers(1)["c1"]
    assert parses == {"decode_request": 1, "peek_meta": 1, "peek_id": 0}


def test_failover_is_told_of_failed_and_good_runs(stack: Stack) -> None:
    stack.session.fail_on = 2.0
    stack.scheduler.start()
    stack.scheduler.submit(job(1))
    stack.answers(1)
    stack.scheduler.submit(job(2))
    answer = stack.answers(2)["c2"]
    assert answer["parameters"]["code"] == "INTERNAL"
    assert "the accelerator fell over" in answer["error"]
    # The client's own mistake (a tensor of the wrong shape) is not the runtime's failure.
    stack.scheduler.submit(job(3, header={"id": "j3", "model_name": "m", "inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}))
    assert stack.answers(3)["c3"]["parameters"]["code"] == "INVALID_ARGUMENT"
    assert stack.observer.runs == [("m:1", 1)]
    assert stack.observer.failures == [("m:1", "the accelerator fell over")]


def test_a_shadow_copy_runs_after_the_answer_and_never_holds_it(tmp_path: Path) -> None:
    """m:2 is m:1's shadow, held up (its gate shut): jobs naming no version are answered
    by m:1 all the same; each becomes a copy compared once the shadow runs; a job naming
    m:1 is not copied, and a job naming m:2 gets m:2's answer."""
    stack = Stack(tmp_path, FakeSession())
    shadow_session = FakeSession()
    shadow_session.gate = threading.Event()
    stack.registry.replace([ServingModel(_spec(), stack.session, []),
                            ServingModel(_spec(version="2", shadow=True), shadow_session, [])])
    try:
        stack.scheduler.start()
        for n in (1, 2):
            stack.scheduler.submit(job(n))
        got = stack.answers(2)
        assert [got[f"c{n}"]["model_version"] for n in (1, 2)] == ["1", "1"]
        assert shadow_session.entered.wait(5)  # the first copy waits at the gate meanwhile
        stack.scheduler.submit(job(3, header={"id": "j3", "model_name": "m",
                                              "model_version": "1", "inputs": [
                                                  {"name": "x", "shape": [1, 4],
                                                   "datatype": "FP32", "data": [3] * 4}]}))
        assert stack.answers(3)["c3"]["model_version"] == "1"
        shadow_session.gate.set()
        deadline = time.monotonic() + 5
        while (stack.metrics.shadow_figures().get("m:2", {}).get("compared", 0) < 2
               and time.monotonic() < deadline):
            time.sleep(0.01)
        figures = stack.metrics.shadow_figures()["m:2"]
        assert (figures["compared"], figures["agreed"], figures["dropped"]) == (2, 2, 0)
        assert sorted(shadow_session.ran) == [1.0, 2.0]  # job 3 named its version: no copy
        stack.scheduler.submit(job(4, header={"id": "j4", "model_name": "m",
                                              "model_version": "2", "inputs": [
                                                  {"name": "x", "shape": [1, 4],
                                                   "datatype": "FP32", "data": [4] * 4}]}))
        assert stack.answers(4)["c4"]["model_version"] == "2"
    finally:
        stack.close()
