"""A job's OIP header, read once: by the intake, or (a long one) by the worker that runs it.

Every parse of a job's payload happens here. The intake reads each arriving job's header
(`read_header`) before it journals it, and the typed `Job` (agent/jobs.py) carries what
was read to whoever runs the job, so the worker parses nothing again. A header over
INTAKE_DECODE_MAX is the one exception: the intake only peeks at its meta (id, priority,
timeout), and the worker decodes it in full (`decode_deferred`), so that queued jobs are
held as bytes and not as Python lists. A job refused before it is read (a full intake or
queue, one that ran too often) is only peeked at for its id (`peek_job_id`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.protocol import (
    HEADER_LENGTH_PROPERTY,
    JobMeta,
    RawRequest,
    decode_request,
    meta_of,
    peek_meta,
)
from edgeinfer.contract.errors import JobError

log = logging.getLogger(__name__)

# A job's header is decoded in full by the intake when it is at most this long (a binary
# job's JSON part; a small JSON job); a longer one (a JSON job carrying its tensors as
# lists) is only peeked at there and decoded by its worker.
INTAKE_DECODE_MAX = 64 * 1024


@dataclass(frozen=True)
class Header:
    """What the intake read of a job's header: its meta (id, priority, timeout, cancel),
    the decoded request (None when not decoded), or the JobError that decoding gave."""

    meta: JobMeta
    request: RawRequest | None
    problem: JobError | None


def header_length(inbound: Inbound) -> int:
    """The length of a job's JSON header: Inference-Header-Content-Length when it is a
    usable number, else the whole payload."""
    text = inbound.user_property(HEADER_LENGTH_PROPERTY)
    if text is not None and text.isascii() and text.isdecimal() and int(text) > 0:
        return min(int(text), len(inbound.payload))
    return len(inbound.payload)


def read_header(inbound: Inbound, max_message_bytes: int) -> Header:
    """A job's header, parsed once for its whole way. A header over INTAKE_DECODE_MAX, an
    unreadable packet or a payload over the limit is only peeked at (its meta)."""
    payload, props = inbound.payload, inbound.user_properties
    if (inbound.unreadable is None and len(payload) <= max_message_bytes
            and header_length(inbound) <= INTAKE_DECODE_MAX):
        try:
            req = decode_request(payload, props)
            meta = meta_of(req)
            req.timeout_ms, req.sent_at_ms  # noqa: B018 - their checks raise JobError
        except JobError as err:
            return Header(peek_meta(payload, props), None, err)
        except Exception:
            log.exception("job header could not be read at intake; its worker tries")
        else:
            return Header(meta, req, None)
    return Header(peek_meta(payload, props), None, None)


def decode_deferred(inbound: Inbound) -> RawRequest:
    """The worker's decode of a header the intake only peeked at; raises JobError."""
    return decode_request(inbound.payload, inbound.user_properties)


def peek_job_id(payload: bytes, user_properties: Sequence[tuple[str, str]]) -> str | None:
    """The id of a job refused before its header was read, for its error answer."""
    return peek_meta(payload, user_properties).id
