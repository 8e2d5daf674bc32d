"""Why a link to the broker ends: the exceptions that end it on the I/O thread, and a
broker's reason code in words (as paho words it), for logs, events and `last_disconnect`."""

from __future__ import annotations

# Why a link ended when the broker closed it without a DISCONNECT.
CLOSED_BY_BROKER = "the broker closed the connection"
TAKEN_OVER = 0x8E  # DISCONNECT reason code: Session taken over


class LinkDropped(Exception):
    """The link is gone (or must be dropped); the message says why."""


class TakenOver(LinkDropped):
    """The broker ended the link because another client connected with our client id."""


def reason_words(code: object, text: str | None) -> str:
    """'Not authorized (0x87): <the broker's reason string>'."""
    value = int(code)  # type: ignore[call-overload]
    name = getattr(code, "name", None) or "reason"
    words = f"{name.replace('_', ' ').capitalize()} (0x{value:02x})"  # as paho words it
    return f"{words}: {text}" if text else words
