"""Typed errors of inference jobs, one class per DESIGN.md error code.

Callers catch what they can act on (`except ResourceExhausted: back off`) and let the
rest travel as `InferenceError`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from edgeinfer.contract.errors import Code


class InferenceError(Exception):
    """A job answered with an error response: `code`, `message` and the raw `response`."""

    # The code this class stands for (used to pick the class for a response).
    default_code: ClassVar[Code | str] = Code.INTERNAL

    def __init__(
        self,
        code: Code | str,
        message: str,
        *,
        job_id: str | None = None,
        response: dict[str, Any] | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.job_id = job_id
        self.response = response
        super().__init__(f"{_code_text(self.code)}: {message}")


class InvalidArgument(InferenceError):
    default_code = Code.INVALID_ARGUMENT


class NotFound(InferenceError):
    default_code = Code.NOT_FOUND


class ResourceExhausted(InferenceError):
    default_code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(InferenceError):
    default_code = Code.DEADLINE_EXCEEDED


class Unavailable(InferenceError):
    default_code = Code.UNAVAILABLE


class Internal(InferenceError):
    default_code = Code.INTERNAL


_BY_CODE: dict[str, type[InferenceError]] = {
    cls.default_code: cls
    for cls in (InvalidArgument, NotFound, ResourceExhausted, DeadlineExceeded, Unavailable,
                Internal)
}


def _code_text(code: Code | str) -> str:
    return code.value if isinstance(code, Code) else code


def error_from_code(
    code: str,
    message: str,
    *,
    job_id: str | None = None,
    response: dict[str, Any] | None = None,
) -> InferenceError:
    """The exception for a code; an unknown code (a newer agent) stays an InferenceError."""
    try:
        known: Code | str = Code(code)
    except ValueError:
        return InferenceError(code, message, job_id=job_id, response=response)
    return _BY_CODE[known](known, message, job_id=job_id, response=response)
