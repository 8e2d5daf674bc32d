"""What the MQTT session and its owner hand each other: a received message (`Inbound`), a
subscription with its handler (`Route`), the retained will (`Retained`), and the table that
finds a message's route.

A received message's `mid` carries the connection it came on (bits 16 up) and the owner's
`mid_tag` (bits 48 up, `session_of_mid`), so that its PUBACK goes back on the session, and
only the session, it came in on (agent/mqtt_session/outbound.py checks the connection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Inbound:
    """What a handler gets: the message, its v5 properties and when it arrived."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None
    correlation_data: bytes | None
    user_properties: tuple[tuple[str, str], ...]
    expiry_s: int | None
    received: float  # time.monotonic()
    received_wall: float = 0.0  # time.time(), for deadlines that outlive the process
    mid: int = 0  # for the manual PUBACK once the job is journaled
    # Set when the MQTT packet could not be read in full (agent/mqtt_wire.py): why. The
    # fields above hold what could be read; a job route answers it INVALID_ARGUMENT.
    unreadable: str | None = None
    # Set when the payload was over its route's max_payload: its length in bytes. The
    # payload was dropped unread (`payload` is empty); the fields above are what the
    # variable header said. A job route answers it INVALID_ARGUMENT.
    oversize: int = 0

    def user_property(self, name: str) -> str | None:
        for key, value in self.user_properties:
            if key == name:
                return value
        return None


Handler = Callable[[Inbound], None]


@dataclass(frozen=True)
class Route:
    subscription: str  # what we subscribe to (may be $share/...)
    qos: int
    handler: Handler
    # Also hand over messages whose packet could not be read in full (Inbound.unreadable
    # says why); other routes never see them (they are acknowledged and logged).
    takes_unreadable: bool = False
    # A payload over this many bytes is not read: the message reaches the handler with
    # `Inbound.oversize` set when the route takes unreadable ones, else it is acknowledged
    # and dropped (logged). None: no limit beyond MQTT's own.
    max_payload: int | None = None

    @property
    def match_filter(self) -> str:
        # Messages of a shared subscription arrive on the plain topic.
        if self.subscription.startswith("$share/"):
            return self.subscription.split("/", 2)[2]
        return self.subscription


@dataclass(frozen=True)
class Retained:
    topic: str
    payload: bytes


def session_of_mid(mid: int) -> int:
    """The `mid_tag` of the session a received message came in on."""
    return mid >> 48


class RouteTable:
    """The routes by topic, built once: exact topics in a dict, wildcard filters in order;
    the first route that matches wins (an exact route behind a wildcard that also matches
    it stays in the ordered list)."""

    __slots__ = ("_exact", "_wild")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._exact: dict[str, Route] = {}
        self._wild: list[tuple[tuple[str, ...], Route]] = []
        for route in routes:
            filt = route.match_filter
            words = tuple(filt.split("/"))
            if "+" in words or "#" in words or any(matches(w, filt) for w, _ in self._wild):
                self._wild.append((words, route))
            else:
                self._exact.setdefault(filt, route)

    def find(self, topic: str) -> Route | None:
        """The route a message on `topic` goes to; None when no route takes it."""
        route = self._exact.get(topic)
        if route is None:
            for words, candidate in self._wild:
                if matches(words, topic):
                    return candidate
        return route


def matches(words: tuple[str, ...], topic: str) -> bool:
    """MQTT topic filter matching (`words`: the filter split at `/`); `$` topics match no
    leading wildcard."""
    levels = topic.split("/")
    if levels[0].startswith("$") and words and words[0] in ("+", "#"):
        return False
    for i, word in enumerate(words):
        if word == "#":
            return True
        if i >= len(levels):
            return False
        if word != "+" and word != levels[i]:
            return False
    return len(levels) == len(words)
