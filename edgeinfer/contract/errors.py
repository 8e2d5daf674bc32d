"""Error codes of DESIGN.md and the exception that carries them."""

from __future__ import annotations

from enum import Enum


# str + Enum and not StrEnum: str(Code.X) stays "Code.X" as every message built with it expects.
class Code(str, Enum):  # noqa: UP042
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class JobError(Exception):
    """A job that cannot be answered with outputs; the message is for a person."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
