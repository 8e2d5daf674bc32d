"""What the HTTP endpoint hands the job path and what it makes of the answer: pure, no I/O.

A route becomes the `Inbound` an MQTT client's message would be: an inference request
is the OIP body unchanged (JSON, or Triton's binary extension, its header's length in the
`Inference-Header-Content-Length` user property, as over MQTT), the model named by the
`model_name`/`model_version` user properties (KServe names it in the path, not the body);
a health or metadata route is the query of edgeinfer/contract/queries.py (`oip_request`)
with an empty body. So the agent's own code reads and answers both, as for MQTT.

The answer's bytes are sent unchanged; only its status is read from it, as KServe and
Triton set theirs: 200 with outputs or a query's answer, 400 for a server or model that is
not ready (Triton's `/ready` routes; tritonclient reads only 200 or not), and for an
error body `{"id", "error", "parameters": {"code"}}` the status of its code (STATUS).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.protocol import (
    HEADER_LENGTH_PROPERTY,
    MODEL_NAME_PROPERTY,
    MODEL_VERSION_PROPERTY,
)
from edgeinfer.contract.errors import Code
from edgeinfer.contract.queries import QUERY_PROPERTY, QueryKind

# KServe v2 / Triton: the HTTP status of an OIP error code.
STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 503,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.INTERNAL: 500,
}
NOT_READY = 400  # Triton's status for GET .../ready of a server or model not ready
JSON = "application/json"
BINARY = "application/octet-stream"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class _Peek(msgspec.Struct):
    """What the status is read from (the rest of the body is skipped, not kept)."""

    error: str | None = None
    parameters: dict[str, object] | None = None
    ready: bool | None = None


_peek = msgspec.json.Decoder(_Peek)


def model_properties(model: str, version: str | None) -> list[tuple[str, str]]:
    props = [(MODEL_NAME_PROPERTY, model)]
    if version is not None:
        props.append((MODEL_VERSION_PROPERTY, version))
    return props


def query_inbound(topic: str, reply_topic: str, kind: QueryKind, model: str | None = None,
                  version: str | None = None) -> Inbound:
    props = [(QUERY_PROPERTY, kind.value)]
    if model is not None:
        props += model_properties(model, version)
    return _inbound(topic, reply_topic, b"", props, None)


def infer_inbound(topic: str, reply_topic: str, model: str, version: str | None,
                  body: bytes, header_length: str | None, timeout_s: float) -> Inbound:
    """An inference request as a job. Its expiry is what is left of the request's
    timeout: a job the waiting request has given up on is not run (nor, after a restart,
    a journaled one: its deadline has passed)."""
    props = model_properties(model, version)
    if header_length is not None:
        props.append((HEADER_LENGTH_PROPERTY, header_length))
    return _inbound(topic, reply_topic, body, props, max(1, math.ceil(timeout_s)))


def _inbound(topic: str, reply_topic: str, payload: bytes, props: Sequence[tuple[str, str]],
             expiry_s: int | None) -> Inbound:
    # QoS 0 and mid 0: nothing to acknowledge to a broker (the session's ack skips it).
    return Inbound(topic=topic, payload=payload, qos=0, retain=False,
                   response_topic=reply_topic, correlation_data=None,
                   user_properties=tuple(props), expiry_s=expiry_s,
                   received=time.monotonic(), received_wall=time.time())


def http_reply(payload: bytes, user_properties: Sequence[tuple[str, str]]) -> Reply:
    """The answer the job path would publish, as the HTTP answer: the same bytes."""
    props = dict(user_properties)
    length = props.get(HEADER_LENGTH_PROPERTY)
    if length is not None:  # Triton's binary extension: outputs after a JSON header
        return Reply(200, {HEADER_LENGTH_PROPERTY: length, "Content-Type": BINARY}, payload)
    try:
        peek = _peek.decode(payload)
    except msgspec.DecodeError:
        return Reply(500, {"Content-Type": BINARY}, payload)  # never one of ours
    status = 200
    if peek.error is not None:
        code = (peek.parameters or {}).get("code")
        status = next((s for c, s in STATUS.items() if c.value == code), 500)
    elif peek.ready is False:
        status = NOT_READY
    return Reply(status, {"Content-Type": JSON}, payload)
