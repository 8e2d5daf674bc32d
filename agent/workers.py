"""Workers: take a job from the work queue, check it against its model, run it, answer it.

A worker (or the intake, for a short job when nothing waits: agent/intake.py) runs one
`Job` at a time: a cancel request is answered at once; any other job is checked against
its model (`prepare`: the reply topic, the deadline, the tensors the model or its
pipeline takes) and then run alone or handed to its model's batcher (agent/batching.py).
Every job gets one answer, recorded by the group commit (agent/answers.py). A job's header
was read by the intake; the worker decodes it only when the intake left it as bytes (a
header over INTAKE_DECODE_MAX).

Each run's outcome is told to a `RunObserver` (agent/failover.py's FailoverManager, which
demotes a runtime that keeps failing): `failed` when the runtime raised, `returned` with
the inputs and outputs otherwise. Errors of the client's making (BadInput, a pipeline's
ValueError on bad media) are told to nobody.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

import msgspec
import numpy as np

from edgeinfer.agent.answers import Answers
from edgeinfer.agent.batching import Batcher, Prepared, batchable, split_outputs
from edgeinfer.agent.config import JobsConfig
from edgeinfer.agent.headers import decode_deferred
from edgeinfer.agent.inflight import Ledger
from edgeinfer.agent.jobs import (
    Answer,
    Job,
    Reply,
    WorkQueue,
    check_deadline,
    deadline_of,
    job_key,
    oversize_text,
)
from edgeinfer.agent.journal import Journal
from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.outbox import OutboxPublisher
from edgeinfer.agent.protocol import check_inputs, check_outputs, encode_error, encode_response
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.agent.shadow import Copy, ShadowLane
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.runtimes.base import BadInput, Session
from edgeinfer.runtimes.pipelines.base import Pipeline, StreamingPipeline

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder()
Tensors = dict[str, np.ndarray]


class RunObserver(Protocol):
    """Told the outcome of every run of a model's runtime, on the thread that ran it."""

    def failed(self, model: ServingModel, exc: BaseException) -> None:
        """The run raised (not for the client's bad inputs)."""

    def returned(self, model: ServingModel, inputs: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> None:
        """The run gave `outputs` (one mapping per job) for `inputs`."""


class Unobserved:
    """A RunObserver that is told and does nothing (no failover)."""

    def failed(self, model: ServingModel, exc: BaseException) -> None:
        pass

    def returned(self, model: ServingModel, inputs: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> None:
        pass


class _Answered(Exception):
    """A job answered before it could run (an error); carries the answer."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("answered")
        self.answer = answer


class Workers:
    def __init__(self, registry: ServedModels, metrics: Metrics, journal: Journal,
                 outbox: OutboxPublisher, answers: Answers, ledger: Ledger,
                 work_q: WorkQueue, results_topic: str, cfg: JobsConfig,
                 observer: RunObserver, stopping: threading.Event,
                 shadows: ShadowLane | None = None) -> None:
        self._registry = registry
        self._shadows = shadows  # copies for shadow versions (agent/shadow.py)
        self._metrics = metrics
        self._journal = journal
        self._outbox = outbox
        self._answers = answers
        self._ledger = ledger
        self._work_q = work_q
        self._results_topic = results_topic
        self._cfg = cfg
        self._observer = observer
        self._stopping = stopping
        self._lock = threading.Lock()
        # A retired model's batcher goes with it.
        self._batchers: weakref.WeakKeyDictionary[ServingModel, Batcher] = (
            weakref.WeakKeyDictionary()
        )
        # Recent wall time of a run per payload byte, per tensor model name (EWMA), for the
        # intake's choice to run a job itself: per byte, since one model's jobs range from
        # one row to a batch of hundreds, and a rate learned on small jobs must not let a
        # large one run inline.
        self._run_s_per_byte: dict[str, float] = {}
        self.executed = 0  # inference runs in this process

    def run_s_per_byte(self, model_name: str) -> float | None:
        return self._run_s_per_byte.get(model_name)

    def loop(self) -> None:
        """A worker thread: jobs from the work queue until its stop."""
        while True:
            job = self._work_q.get()
            if job is None:
                return
            # Backpressure: answers wait on disk for the broker; do not pile up more. Nor
            # in memory, while answers wait for room on a full disk.
            while not self._outbox.wait_room(0.5) or not self._answers.flow.wait(0.5):
                if self._stopping.is_set():
                    break
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """A worker's (or the intake's) turn with one job, seen by longest_job meanwhile."""
        with self._ledger.busy():
            self._process(job)

    def _process(self, job: Job) -> None:
        """Answer one job: at once, or by handing it to its model's batcher."""
        if job.meta.cancel is not None:
            self._finish(job, self._cancel(job))
            return
        try:
            prepared = self._prepare(job)
        except _Answered as done:
            self._finish(job, done.answer)
            return
        batcher = self._batcher_for(prepared)
        if batcher is None:
            started = time.monotonic()
            self._run_batch([prepared])
            # Not for a lazy version: the intake never runs its jobs inline, as one may
            # have to wait for its load.
            if prepared.model.spec.task == "tensor" and prepared.model.lazy is None:
                rate = (time.monotonic() - started) / max(1, len(prepared.inbound.payload))
                name = prepared.request.model_name
                before = self._run_s_per_byte.get(name)
                self._run_s_per_byte[name] = rate if before is None else 0.8 * before + 0.2 * rate
        else:
            batcher.offer(prepared)

    def _cancel(self, job: Job) -> Answer:
        """A request to stop a running job of the same client (same reply topic)."""
        meta = job.meta
        assert meta.cancel is not None
        found = self._ledger.cancel(job_key(job.inbound, self._results_topic, meta.cancel))
        body = {"model_name": "", "model_version": "", "outputs": [],
                "parameters": {"cancel": meta.cancel, "found": found}}
        if meta.id is not None:
            body["id"] = meta.id
        return Answer(job.reply, _json.encode(body), (), False)

    def _batcher_for(self, job: Prepared) -> Batcher | None:
        model = job.model
        policy = model.spec.batching
        if policy.max_batch <= 1 or model.spec.task != "tensor":
            return None
        with self._lock:
            batcher = self._batchers.get(model)
            if batcher is None:
                if not batchable(model.session.inputs, model.session.outputs):
                    return None
                batcher = Batcher(policy.max_batch, policy.max_delay_ms, self._run_batch)
                self._batchers[model] = batcher
        return batcher

    def _prepare(self, job: Job) -> Prepared:
        """Check a job against its model (decoding it if the intake did not); raises
        _Answered when it will not run."""
        inbound, reply = job.inbound, job.reply
        model: ServingModel | None = None
        try:
            if reply.refusal is not None:
                raise JobError(Code.INVALID_ARGUMENT, reply.refusal)
            if inbound.unreadable is not None:  # its MQTT packet could not be read in full
                raise JobError(Code.INVALID_ARGUMENT, inbound.unreadable)
            if len(inbound.payload) > self._cfg.max_message_bytes:
                # Journaled under a larger limit before a restart (the session refuses
                # the others before they are held whole: the intake's refusal of oversize).
                raise JobError(Code.INVALID_ARGUMENT, oversize_text(
                    len(inbound.payload), self._cfg.max_message_bytes))
            if job.problem is not None:
                raise job.problem
            if job.request is not None:  # decoded, timeout checked, by the intake
                req, deadline = job.request, job.deadline
            else:  # a header over INTAKE_DECODE_MAX: only peeked at by the intake
                req = decode_deferred(inbound)
                deadline = deadline_of(inbound, req.timeout_ms, req.sent_at_ms)
            check_deadline(deadline)
            model = self._registry.acquire(req.model_name, req.model_version,
                                           req.id if req.id is not None else job.key)
            if model.lazy is not None:  # `load: lazy`: loaded now if it is not (model_cache)
                model.lazy.ensure(model, deadline)
            pipeline = model.pipeline()
            in_specs, out_specs = model.tensors()
            knobs = pipeline.optional_inputs() if pipeline is not None else []
            arrays = check_inputs(req, in_specs, model.label, self._cfg.max_tensor_elements,
                                  optional=knobs)
            wanted = check_outputs(req, out_specs, model.label)
            return Prepared(job.key, inbound, reply, req, model, arrays, wanted, deadline)
        except Exception as exc:
            if model is not None:
                model.release()
            label = model.label if model is not None else None
            # The id the intake read (the request's own when it decoded, a peek otherwise).
            raise _Answered(self._error_answer(reply, job.meta.id, label, exc, False)) from None

    def _run_batch(self, jobs: list[Prepared]) -> None:
        """Run jobs of one model (one, or a batch) and answer each. Never raises."""
        try:
            live: list[Prepared] = []
            for job in jobs:
                try:
                    check_deadline(job.deadline)
                    live.append(job)
                except JobError as err:
                    self._finish_prepared(job, self._error_answer(
                        job.reply, job.request.id, job.model.label, err, False))
            if not live:
                return
            self._journal.running([(job.key, job.inbound.received_wall) for job in live])
            try:
                self._run_live(live)
            finally:
                self._journal.done_running()
        except Exception:
            # Jobs not answered stay in the journal and run again after a restart.
            log.exception("batch of %d job(s) failed", len(jobs))

    def _run_live(self, live: list[Prepared]) -> None:
        """Run jobs past their deadline check and answer each."""
        model = live[0].model
        session = model.session
        with self._lock:
            self.executed += len(live)
        pipeline = model.pipeline()
        try:
            with model.instances:  # the manifest's `instances`: runs at once on the session
                started = time.monotonic()  # queue time includes the wait for an instance
                results = self._infer(model, pipeline, live)
        except Exception as exc:
            if isinstance(exc, BadInput) or (pipeline is not None and isinstance(exc, ValueError)):
                # Inputs the model cannot take (by the runtime's exception type, past what
                # check_inputs saw), or the pipeline's word on bad media (a truncated JPEG,
                # not audio, ...): the client's error, never counted toward a failover.
                failure = JobError(Code.INVALID_ARGUMENT, f"{model.label}: {exc}")
            else:
                self._observer.failed(model, exc)  # demoted after K in a row (failover.py)
                failure = JobError(Code.INTERNAL,
                                   f"{session.runtime} failed on {model.label}: {exc}")
            for job in live:
                self._finish_prepared(job, self._error_answer(
                    job.reply, job.request.id, model.label, failure, True))
            return
        infer_ms = (time.monotonic() - started) * 1000.0
        self._observer.returned(model, [j.arrays for j in live], results)
        # The one look per run for a shadow of this name (None unless a manifest has one).
        shadow = self._registry.shadow_of(model.spec.name)
        for job, outputs in zip(live, results, strict=True):
            queue_ms = (started - job.inbound.received) * 1000.0
            params: dict[str, object] = {
                "runtime": session.runtime,
                "device": session.device,
                "queue_ms": round(queue_ms, 3),
                "infer_ms": round(infer_ms, 3),
            }
            if len(live) > 1:
                params["batch_size"] = sum(j.rows for j in live)
            if pipeline is not None and job.request.parameters.get("stream"):
                params["sequence_end"] = True
            ok = False
            try:
                encoded = encode_response(job.request, model.spec.name, model.spec.version,
                                          outputs, params)
                answer = Answer(job.reply, encoded.payload, encoded.user_properties, True)
                self._metrics.record_ok(model.label, queue_ms, infer_ms,
                                        (time.monotonic() - job.inbound.received) * 1000.0)
                ok = True
            except Exception as exc:
                answer = self._error_answer(job.reply, job.request.id, model.label, exc, True)
            self._finish_prepared(job, answer)
            if shadow is not None and ok and job.request.model_version is None:
                self._copy(shadow, job, outputs, infer_ms)

    def _copy(self, shadow: ServingModel, job: Prepared, outputs: Tensors,
              infer_ms: float) -> None:
        """After its answer went to the group commit: a copy of an OK job that named no
        version for its name's shadow (off this thread, never answered: agent/shadow.py)."""
        if self._shadows is not None and shadow is not job.model:
            self._shadows.offer(Copy(shadow.spec.name, shadow.spec.version, job.arrays,
                                     job.wanted, outputs, infer_ms))

    def _infer(self, model: ServingModel, pipeline: Pipeline | None,
               live: list[Prepared]) -> list[Tensors]:
        """The outputs of each job: through its pipeline, alone, or merged into one batch."""
        if pipeline is not None:
            (job,) = live  # pipelines are never batched
            produced = self._run_pipeline(pipeline, job)
            return [{k: v for k, v in produced.items() if job.wanted is None or k in job.wanted}]
        if len(live) == 1:
            return [model.session.infer(live[0].arrays, live[0].wanted)]
        merged = {name: np.concatenate([j.arrays[name] for j in live], axis=0)
                  for name in live[0].arrays}
        return split_outputs(model.session.infer(merged, live[0].wanted), [j.rows for j in live])

    def _run_pipeline(self, pipeline: Pipeline, job: Prepared) -> Tensors:
        """A pipeline's answer; a streaming one sends its partial answers on the way.

        Text generation streams when the request says `"parameters": {"stream": true}`:
        every chunk but the last goes out at once with `sequence_end: false` (through the
        outbox, so a restart does not lose them), and the last is the job's final answer.
        A running job can be stopped by a request with `"parameters": {"cancel": "<id>"}`.
        """
        # A multi-model task's pipeline (ocr) is run on the role -> Session mapping that
        # ServingModel.pipeline_session gives for it, and its `run` is typed to take it.
        session = cast(Session, job.model.pipeline_session)
        if not isinstance(pipeline, StreamingPipeline):
            return dict(pipeline.run(session, job.arrays))
        with self._ledger.cancel_switch(job.key) as cancel:
            if not job.request.parameters.get("stream"):
                return dict(pipeline.run(session, job.arrays, cancel))
            last: Tensors | None = None
            for chunk in pipeline.run_stream(session, job.arrays, cancel):
                if last is not None:
                    self._send_partial(job, last)
                last = chunk
            assert last is not None  # the stream always ends with a chunk
            return last

    def _send_partial(self, job: Prepared, outputs: Tensors) -> None:
        model = job.model
        encoded = encode_response(job.request, model.spec.name, model.spec.version, outputs,
                                  {"sequence_end": False, "runtime": model.session.runtime,
                                   "device": model.session.device})
        self._answers.send_partial(job.reply.topic, encoded.payload,
                                   job.reply.correlation_data, encoded.user_properties)

    def _error_answer(self, reply: Reply, job_id: str | None, model_label: str | None,
                      exc: Exception, executed: bool) -> Answer:
        if isinstance(exc, JobError):
            err = exc
        else:
            # A bug of ours must still give the job its one answer.
            log.error("job failed unexpectedly", exc_info=exc)
            err = JobError(Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        self._metrics.record_error(model_label, err.code.value)
        log.debug("job %s: %s %s", job_id, err.code.value, err.message)
        return Answer(reply, encode_error(job_id, err.code, err.message), (), executed)

    def _finish_prepared(self, job: Prepared, answer: Answer) -> None:
        job.model.release()
        self._answers.finish(job.key, len(job.inbound.payload), answer)

    def _finish(self, job: Job, answer: Answer) -> None:
        self._answers.finish(job.key, len(job.inbound.payload), answer)
