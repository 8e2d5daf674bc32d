"""Reading an OIP v2 request: its payload decoded into a `RawRequest` (names resolved,
tensors still as sent), and the cheap peeks the intake takes before a job is journaled
(`peek_id`, `peek_meta`). Every problem is a `JobError` with a message that names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from edgeinfer.contract.errors import Code, JobError
from edgeinfer.contract.queries import MODEL_NAME_PROPERTY, MODEL_VERSION_PROPERTY
from edgeinfer.contract.topics import NAME_RE
from edgeinfer.structcheck import StructError, convert, not_utf8

# Triton's binary-data extension: the JSON header's length, as an MQTT user property.
HEADER_LENGTH_PROPERTY = "Inference-Header-Content-Length"
# The user properties that are part of what a request asks for, beside its payload (the
# request's identity for de-duplication: agent/jobs.py's request_digest).
REQUEST_PROPERTIES = frozenset({HEADER_LENGTH_PROPERTY, MODEL_NAME_PROPERTY, MODEL_VERSION_PROPERTY})


class RequestTensor(msgspec.Struct):
    """One input as the request sends it: data as JSON, or its size in the binary section."""

    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(msgspec.Struct):
    """An output the request asks for (`parameters.binary_data`: in the binary section)."""

    name: str
    parameters: dict[str, Any] | None = None


class _Request(msgspec.Struct):
    inputs: list[RequestTensor]
    id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class _IdOnly(msgspec.Struct):
    id: Any = None


class _Meta(msgspec.Struct):
    id: Any = None
    parameters: Any = None


_request_decoder = msgspec.json.Decoder(_Request)
_id_decoder = msgspec.json.Decoder(_IdOnly)
_meta_decoder = msgspec.json.Decoder(_Meta)


@dataclass(frozen=True)
class RawRequest:
    """A decoded request before it has met a model: names resolved, tensors not yet checked."""

    id: str | None
    model_name: str
    model_version: str | None
    inputs: list[RequestTensor]
    binary: memoryview
    outputs: list[RequestedOutput] | None
    parameters: Mapping[str, Any]

    @property
    def timeout_ms(self) -> float | None:
        value = self.parameters.get("timeout_ms")
        if value is None and "timeout" in self.parameters:
            # Triton's own request parameter, in microseconds (tritonclient's `timeout=`).
            micros = self.parameters["timeout"]
            if isinstance(micros, bool) or not isinstance(micros, (int, float)) or micros <= 0:
                raise JobError(Code.INVALID_ARGUMENT, "parameters.timeout must be a positive "
                               "number of microseconds")
            return float(micros) / 1000.0
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise JobError(Code.INVALID_ARGUMENT, "parameters.timeout_ms must be a positive number")
        return float(value)

    @property
    def sent_at_ms(self) -> float | None:
        """When the client sent the job (its wall clock, ms since the epoch), if it says."""
        value = self.parameters.get("sent_at_ms")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise JobError(Code.INVALID_ARGUMENT, "parameters.sent_at_ms must be a positive number")
        return float(value)

    def wants_binary(self, output_name: str) -> bool:
        for out in self.outputs or ():
            if out.name == output_name and out.parameters and "binary_data" in out.parameters:
                return bool(out.parameters["binary_data"])
        return bool(self.parameters.get("binary_data_output", False))


def peek_id(payload: bytes) -> str | None:
    """The job id, if one can be read cheaply: for answering a job we will not run."""
    try:
        value = _id_decoder.decode(payload).id
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) and NAME_RE.match(value) else None


@dataclass(frozen=True)
class JobMeta:
    """What the intake reads of a job before it is journaled: identity and urgency."""

    id: str | None
    priority: int | None
    timeout_ms: float | None
    sent_at_ms: float | None
    cancel: str | None = None  # parameters.cancel: the id of a job to stop


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


def peek_meta(payload: bytes, user_properties: Sequence[tuple[str, str]]) -> JobMeta:
    """Id, priority and timeout of a job, read without decoding its tensors.

    Anything unreadable reads as absent: the full decode later names the problem.
    """
    header = payload
    length = dict(user_properties).get(HEADER_LENGTH_PROPERTY)
    # isdecimal() alone would let "²" through, which int() refuses.
    if length is not None and length.isascii() and length.isdecimal() and (
            0 < int(length) <= len(payload)):
        header = payload[: int(length)]
    try:
        meta = _meta_decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return JobMeta(None, None, None, None)
    return _job_meta(meta.id, meta.parameters)


def meta_of(req: RawRequest) -> JobMeta:
    """What `peek_meta` reads, taken from a request decoded in full (no second parse)."""
    return _job_meta(req.id, req.parameters)


def _job_meta(raw_id: Any, parameters: Any) -> JobMeta:
    job_id = raw_id if isinstance(raw_id, str) and NAME_RE.match(raw_id) else None
    params = parameters if isinstance(parameters, Mapping) else {}
    priority = params.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, int) or priority <= 0:
        priority = None
    timeout_ms = _number(params.get("timeout_ms"))
    micros = _number(params.get("timeout"))  # Triton's, in microseconds
    if timeout_ms is None and micros is not None:
        timeout_ms = micros / 1000.0
    cancel = params.get("cancel")
    if not isinstance(cancel, str) or not NAME_RE.match(cancel):
        cancel = None
    return JobMeta(job_id, priority, timeout_ms, _number(params.get("sent_at_ms")), cancel)


def _request_problem(header: bytes | memoryview) -> str:
    """Which key of a request the typed decode refused, in our words (runtimes/structcheck).

    Only on that error path: the hot path keeps msgspec's fast typed decode.
    """
    try:
        convert(msgspec.json.decode(header), _Request)
    except StructError as exc:
        return str(exc)
    except (msgspec.DecodeError, RecursionError):
        pass
    return "not an OIP v2 inference request"


def decode_request(
    payload: bytes, user_properties: Sequence[tuple[str, str]]
) -> RawRequest:
    props = dict(user_properties)
    header_len_text = props.get(HEADER_LENGTH_PROPERTY)
    if header_len_text is not None:
        try:
            header_len = int(header_len_text)
        except ValueError:
            raise JobError(
                Code.INVALID_ARGUMENT, f"{HEADER_LENGTH_PROPERTY} must be an integer"
            ) from None
        if not 0 < header_len <= len(payload):
            raise JobError(
                Code.INVALID_ARGUMENT,
                f"{HEADER_LENGTH_PROPERTY}={header_len} does not fit a payload of {len(payload)} bytes",
            )
        header = payload[:header_len]
        binary = memoryview(payload)[header_len:]
    else:
        header = payload
        binary = memoryview(b"")
    try:
        req = _request_decoder.decode(header)
    except msgspec.ValidationError:
        raise JobError(Code.INVALID_ARGUMENT,
                       f"malformed inference request: {_request_problem(header)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Bad UTF-8 is a DecodeError in some msgspec releases, a UnicodeDecodeError in others.
        why = not_utf8(header)
        if why is not None:
            raise JobError(Code.INVALID_ARGUMENT, f"request is not UTF-8: {why}") from None
        raise JobError(Code.INVALID_ARGUMENT, f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise JobError(Code.INVALID_ARGUMENT, "request is nested too deeply") from None

    if req.id is not None and not NAME_RE.match(req.id):
        raise JobError(Code.INVALID_ARGUMENT, "id must match [A-Za-z0-9._-]{1,64}")
    name = req.model_name or props.get(MODEL_NAME_PROPERTY)
    version = req.model_version or props.get(MODEL_VERSION_PROPERTY)
    if not name:
        raise JobError(
            Code.INVALID_ARGUMENT,
            "no model named: set model_name in the request or as an MQTT user property",
        )
    if not NAME_RE.match(name):
        raise JobError(Code.INVALID_ARGUMENT, "model_name must match [A-Za-z0-9._-]{1,64}")
    if version is not None and not NAME_RE.match(version):
        raise JobError(Code.INVALID_ARGUMENT, "model_version must match [A-Za-z0-9._-]{1,64}")
    if not req.inputs:
        raise JobError(Code.INVALID_ARGUMENT, "the request has no inputs")
    return RawRequest(
        id=req.id,
        model_name=name,
        model_version=version,
        inputs=req.inputs,
        binary=binary,
        outputs=req.outputs,
        parameters=req.parameters or {},
    )
