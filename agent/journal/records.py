"""What the journal takes and gives back: a job as journaled (`StoredJob`), a job's final
answer (`Completion`), what admitting a job decided (`Admission`), a done job's stored
answer (`StoredAnswer`), an outbox row (`OutMessage`)."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredJob:
    key: str
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    user_props: tuple[tuple[str, str], ...]
    expiry_s: int | None
    received_wall: float
    attempts: int = 0
    # Identity of the request (agent/jobs.py's request_digest), compared when its key
    # comes again; None: a job whose key cannot come again, never compared.
    digest: bytes | None = None


@dataclass(frozen=True)
class OutMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int
    correlation: bytes | None
    user_props: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Admission:
    """What `admit` decided for one job."""

    kind: str  # "new" | "duplicate_done" | "duplicate_pending" | "conflict"
    job: StoredJob


@dataclass(frozen=True)
class Completion:
    """A job's final answer, to be recorded by `Journal.commit`."""

    key: str
    executed: bool  # the runtime ran it (counted in the row's executions)
    topic: str
    payload: bytes
    correlation: bytes | None
    user_props: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StoredAnswer:
    topic: str
    payload: bytes
    user_props: tuple[tuple[str, str], ...]


def props_from_json(text: str) -> tuple[tuple[str, str], ...]:
    """User properties as the journal stores them (a JSON list of pairs), read back."""
    return tuple((str(k), str(v)) for k, v in json.loads(text))
