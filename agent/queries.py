"""Answers to OIP's health and metadata queries (edgeinfer/contract/queries.py): server
live, ready and metadata, model ready, model metadata, asked on the jobs topics.

Where they are answered: by the intake thread (agent/intake.py), as it takes arrivals
off its queue and before it journals the batch's jobs. Not on the thread that owns the
broker's socket, which only parses, admits and writes; not by a worker, where a query
would wait behind every queued inference job and behind the outbox's backpressure. At the
intake it waits at most for the intake's round under way (one journal transaction, or
one short job the intake runs itself: agent/scheduler.py). A query changes nothing, so
it is neither journaled nor de-duplicated, and its answer is published at once, not
through the outbox (agent/answers.py `SendNow`, as the intake's refusals are): a full
state disk does not stop it, and a lost answer is asked again.

What it reads is cheap and never runs a model: the served models' registry
(agent/served.py) and the reconciler's statuses (what `reported.models` lists). A
model's tensors come from its pipeline, built when the version started serving; only a
version swapped in by a live failover builds its pipeline on its first job or query.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from edgeinfer import __version__
from edgeinfer.agent.answers import SendNow
from edgeinfer.agent.jobs import route_reply
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.protocol import encode_error
from edgeinfer.agent.served import ServedModels, tensor_metadata
from edgeinfer.contract.documents import ModelEntry
from edgeinfer.contract.errors import JobError
from edgeinfer.contract.queries import (
    SERVER_EXTENSIONS,
    SERVER_NAME,
    ModelMetadata,
    ModelReady,
    Query,
    QueryAnswer,
    QueryError,
    QueryKind,
    ServerLive,
    ServerMetadata,
    ServerReady,
    decode_query,
    encode_answer,
    platform_of,
    query_kind,
)

log = logging.getLogger(__name__)


class Queries:
    def __init__(self, registry: ServedModels, statuses: Callable[[], Sequence[ModelEntry]],
                 taking_jobs: Callable[[], bool], send_now: SendNow,
                 ack: Callable[[int, int], None], results_topic: str,
                 reply_prefixes: Sequence[str]) -> None:
        """`statuses`: every version `reported.models` lists (the reconciler's);
        `taking_jobs`: False while the agent drains before a stop."""
        self._registry = registry
        self._statuses = statuses
        self._taking_jobs = taking_jobs
        self._send_now = send_now
        self._ack = ack
        self._results_topic = results_topic
        self._reply_prefixes = tuple(reply_prefixes)
        self.answered_count = 0

    def answered(self, inbound: Inbound) -> bool:
        """Intake thread: when `inbound` is a query, answer and acknowledge it and say
        True; False for anything else (an inference job, or a packet the job path refuses:
        unreadable, or over jobs.max_message_bytes)."""
        kind = query_kind(inbound.user_properties)
        if kind is None or inbound.unreadable is not None or inbound.oversize:
            return False
        reply = route_reply(inbound, self._results_topic, self._reply_prefixes)
        query_id: str | None = None
        try:
            if reply.refusal is not None:
                raise QueryError(reply.refusal)
            query = decode_query(kind, inbound.payload, inbound.user_properties)
            query_id = query.id
            payload = encode_answer(self.answer(query))
        except QueryError as err:
            payload = encode_error(err.id, err.code, err.message)
        except JobError as err:
            payload = encode_error(query_id, err.code, err.message)
        log.debug("query %s answered on %s", kind, reply.topic)
        self._send_now(reply.topic, payload, reply.correlation_data, ())
        self._ack(inbound.mid, inbound.qos)
        self.answered_count += 1
        return True

    def answer(self, query: Query) -> QueryAnswer:
        """A query's answer; raises JobError (NOT_FOUND for a model not served here)."""
        if query.kind is QueryKind.SERVER_LIVE:
            return ServerLive(live=True)  # it answers
        if query.kind is QueryKind.SERVER_READY:
            # KServe's: ready when every model is (each version `reported` lists serves),
            # and here also only while jobs are taken (not while draining before a stop).
            return ServerReady(ready=self._taking_jobs() and all(
                e.state == "serving" for e in self._statuses()))
        if query.kind is QueryKind.SERVER_METADATA:
            return ServerMetadata(name=SERVER_NAME, version=__version__,
                                  extensions=list(SERVER_EXTENSIONS))
        name = query.model_name
        assert name is not None  # decode_query's check for the model kinds
        if query.kind is QueryKind.MODEL_READY:
            return ModelReady(name=name, ready=self._model_ready(name, query.model_version))
        model, versions = self._registry.lookup(name, query.model_version)
        inputs, outputs = model.tensors()
        return ModelMetadata(name=model.spec.name, versions=versions,
                             platform=platform_of(model.session.runtime),
                             inputs=tensor_metadata(inputs), outputs=tensor_metadata(outputs))

    def _model_ready(self, name: str, version: str | None) -> bool:
        """True when a job naming it would run now; False for a version the agent was
        told to serve that is loading or failed; NOT_FOUND, as a job gets, otherwise."""
        try:
            self._registry.lookup(name, version)
        except JobError:
            if any(e.name == name and version in (None, e.version) for e in self._statuses()):
                return False
            raise
        return True
