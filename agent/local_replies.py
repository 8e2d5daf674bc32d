"""Answers that go back to a waiting local request (the HTTP endpoint) instead of a topic.

A request of agent/http_endpoint/ enters the job path as an `Inbound` whose Response Topic
is a reply topic of its own under LOCAL_PREFIX, `$local/http/<128 random bits>`, opened
here with a callback. Whatever the job path would publish to that topic (a final answer, a
refusal, a replay, a query's answer: the same bytes, the same user properties) is handed
to the callback instead (`deliver`), by agent/answers.py (answers and messages through the
outbox) and agent/daemon.py (`send_now`). Nothing under LOCAL_PREFIX ever goes to the
broker: an MQTT client naming such a Response Topic gets no answer there, and it cannot
guess an open one (the random part) to read another request's answer.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

LOCAL_PREFIX = "$local/http/"
# The outbox's ids of the rows it "sends" to a local topic (agent/daemon.py): far above
# any MQTT packet id with its session's bits, so the two never meet.
_SWALLOWED_MID_BASE = 1 << 60

Deliver = Callable[[bytes, tuple[tuple[str, str], ...]], None]


class LocalReplies:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Deliver] = {}
        self._mids = itertools.count(_SWALLOWED_MID_BASE)
        self.dropped = 0  # answers whose request was gone (timed out, closed, before a restart)

    @staticmethod
    def is_local(topic: str) -> bool:
        return topic.startswith(LOCAL_PREFIX)

    def swallowed(self) -> int:
        """An id for an outbox row that went to a local request, not to the broker."""
        return next(self._mids)

    def open(self, deliver: Deliver) -> str:
        """A new reply topic whose first message goes to `deliver` (on the thread that
        delivers it: `deliver` must not block)."""
        topic = LOCAL_PREFIX + secrets.token_hex(16)
        with self._lock:
            self._open[topic] = deliver
        return topic

    def close(self, topic: str) -> None:
        """The request is gone: a later message to `topic` is dropped."""
        with self._lock:
            self._open.pop(topic, None)

    def deliver(self, topic: str, payload: bytes,
                user_properties: Sequence[tuple[str, str]]) -> None:
        """Hand the message to its request (once: a request takes one answer; a partial
        answer of a streaming pipeline would end it, see docs/protocol.md)."""
        with self._lock:
            deliver = self._open.pop(topic, None)
        if deliver is None:
            self.dropped += 1
            log.debug("answer to %s dropped: its request is gone", topic)
            return
        deliver(payload, tuple(user_properties))
