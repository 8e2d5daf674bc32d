"""OIP's health and metadata requests over MQTT: what a device serves and what its models
take and return, asked on the jobs topic and answered in KServe v2's JSON shapes.

A query is a message on a device's (or a pool's) jobs topic with the MQTT user property
`oip_request`, whose value names the call by OIP's own name for it (its gRPC methods):

    ServerLive     -> {"live": true}                        GET v2/health/live
    ServerReady    -> {"ready": bool}                       GET v2/health/ready
    ServerMetadata -> {"name", "version", "extensions"}     GET v2
    ModelReady     -> {"name", "ready": bool}               GET v2/models/{name}[/versions/{v}]/ready
    ModelMetadata  -> {"name", "versions", "platform",      GET v2/models/{name}[/versions/{v}]
                       "inputs": [{"name", "datatype", "shape"}], "outputs": [...]}

The model is named as a job names it: `model_name` (and `model_version`) in a JSON body,
or as user properties of those names; the body may be empty, or `{"id", "model_name",
"model_version"}` and nothing else. A user property and not a JSON field marks the query
so that no inference body (an OIP client library's, published unchanged) can ever read as
one, and so that the agent tells the two apart without parsing the payload. An error is
answered as a job's is (`{"id", "error", "parameters": {"code"}}`): NOT_FOUND for a model
not served, INVALID_ARGUMENT for a malformed query.

The agent answers (agent/queries.py); the SDK asks (fleet/sync_client.py, fleet/aio.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec

from edgeinfer.contract.documents import TensorMetadata
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.contract.topics import NAME_RE
from edgeinfer.structcheck import StructError, convert

QUERY_PROPERTY = "oip_request"
# The user properties that name a model, as on a job (agent/protocol/request.py reads
# the same names for jobs).
MODEL_NAME_PROPERTY = "model_name"
MODEL_VERSION_PROPERTY = "model_version"


# str + Enum and not StrEnum, as contract/errors.py's Code.
class QueryKind(str, Enum):  # noqa: UP042
    SERVER_LIVE = "ServerLive"
    SERVER_READY = "ServerReady"
    SERVER_METADATA = "ServerMetadata"
    MODEL_READY = "ModelReady"
    MODEL_METADATA = "ModelMetadata"

    @property
    def about_a_model(self) -> bool:
        return self in (QueryKind.MODEL_READY, QueryKind.MODEL_METADATA)


KINDS_TEXT = ", ".join(k.value for k in QueryKind)


class QueryError(JobError):
    """A malformed query (INVALID_ARGUMENT), with its id when that could be read."""

    def __init__(self, message: str, query_id: str | None = None) -> None:
        super().__init__(Code.INVALID_ARGUMENT, message)
        self.id = query_id


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    id: str | None = None
    model_name: str | None = None
    model_version: str | None = None


_body_decoder = msgspec.json.Decoder(_Body)


@dataclass(frozen=True)
class Query:
    kind: QueryKind
    id: str | None
    model_name: str | None  # set for the model kinds
    model_version: str | None  # None: the version a job naming none would get


def query_kind(user_properties: Sequence[tuple[str, str]]) -> str | None:
    """The `oip_request` user property's value; None for an inference job."""
    for key, value in user_properties:
        if key == QUERY_PROPERTY:
            return value
    return None


def decode_query(kind_text: str, payload: bytes,
                 user_properties: Sequence[tuple[str, str]]) -> Query:
    """A query from its `oip_request` value, payload and user properties; QueryError names
    what is wrong."""
    body = _read_body(payload)
    query_id = body.id if body.id is not None and NAME_RE.match(body.id) else None
    if body.id is not None and query_id is None:
        raise QueryError("id must match [A-Za-z0-9._-]{1,64}")
    try:
        kind = QueryKind(kind_text)
    except ValueError:
        raise QueryError(f"{QUERY_PROPERTY} {kind_text[:64]!r} is none of {KINDS_TEXT}",
                         query_id) from None
    props = dict(user_properties)
    name = body.model_name or props.get(MODEL_NAME_PROPERTY)
    version = body.model_version or props.get(MODEL_VERSION_PROPERTY)
    if not kind.about_a_model:
        if name is not None or version is not None:
            raise QueryError(f"{kind.value} is about the server and names no model; "
                             "use ModelReady or ModelMetadata", query_id)
        return Query(kind, query_id, None, None)
    if not name:
        raise QueryError(f"{kind.value} needs a model: set model_name in the body or as an "
                         "MQTT user property", query_id)
    if not NAME_RE.match(name):
        raise QueryError("model_name must match [A-Za-z0-9._-]{1,64}", query_id)
    if version is not None and not NAME_RE.match(version):
        raise QueryError("model_version must match [A-Za-z0-9._-]{1,64}", query_id)
    return Query(kind, query_id, name, version)


_NO_JSON = "a query's body is empty or a JSON object; this is no JSON"


def _read_body(payload: bytes) -> _Body:
    if not payload.strip():
        return _Body()
    try:
        return _body_decoder.decode(payload)
    except msgspec.ValidationError:
        pass  # worded below, in our words (a typed decode may refuse bad JSON this way too)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise QueryError(_NO_JSON) from None
    try:
        data = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise QueryError(_NO_JSON) from None
    raw_id = data.get("id") if isinstance(data, dict) else None
    query_id = raw_id if isinstance(raw_id, str) and NAME_RE.match(raw_id) else None
    try:
        convert(data, _Body)
    except StructError as exc:
        raise QueryError(f"malformed query: {exc} (a query's body holds only id, "
                         "model_name and model_version)", query_id) from None
    raise QueryError("malformed query")  # pragma: no cover - convert refuses what msgspec did


def encode_query(kind: QueryKind, *, query_id: str | None = None, model: str | None = None,
                 version: str | None = None) -> tuple[bytes, list[tuple[str, str]]]:
    """A query's payload and user properties (the client's side); ValueError for a model
    kind without a model, or a name outside [A-Za-z0-9._-]{1,64}."""
    if kind.about_a_model and not model:
        raise ValueError(f"{kind.value} needs a model name")
    if not kind.about_a_model and (model is not None or version is not None):
        raise ValueError(f"{kind.value} names no model")
    body: dict[str, str] = {}
    for key, value in (("id", query_id), ("model_name", model), ("model_version", version)):
        if value is not None:
            if not NAME_RE.match(value):
                raise ValueError(f"{key} {value!r} must match [A-Za-z0-9._-]{{1,64}}")
            body[key] = value
    return msgspec.json.encode(body), [(QUERY_PROPERTY, kind.value)]


# -- answers (KServe v2 REST shapes) ----------------------------------------------------


class ServerLive(msgspec.Struct):
    live: bool


class ServerReady(msgspec.Struct):
    ready: bool


class ServerMetadata(msgspec.Struct):
    name: str  # SERVER_NAME
    version: str  # edgeinfer's release
    extensions: list[str]  # SERVER_EXTENSIONS


class ModelReady(msgspec.Struct):
    name: str
    ready: bool


class ModelMetadata(msgspec.Struct):
    name: str
    versions: list[str]  # the versions of `name` served, the one a job naming none gets last
    platform: str  # "onnxruntime_onnx" | "openvino" (platform_of)
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


QueryAnswer = ServerLive | ServerReady | ServerMetadata | ModelReady | ModelMetadata

ANSWER_TYPES: dict[QueryKind, type[QueryAnswer]] = {
    QueryKind.SERVER_LIVE: ServerLive,
    QueryKind.SERVER_READY: ServerReady,
    QueryKind.SERVER_METADATA: ServerMetadata,
    QueryKind.MODEL_READY: ModelReady,
    QueryKind.MODEL_METADATA: ModelMetadata,
}

# What ServerMetadata says of the server: its name, and the KServe v2 protocol extensions
# its answers follow (Triton's names): tensors as binary data after the JSON header, over
# MQTT (the `header_length` user property) and over the local HTTP endpoint alike.
SERVER_NAME = "edgeinfer"
SERVER_EXTENSIONS = ("binary_tensor_data",)

# A runtime's platform as Triton and KServe name it (`platform` of model metadata).
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "cuda": "onnxruntime_onnx",
              "openvino": "openvino"}


def platform_of(runtime: str) -> str:
    return _PLATFORMS.get(runtime, runtime)


_encoder = msgspec.json.Encoder()


def encode_answer(answer: QueryAnswer) -> bytes:
    return _encoder.encode(answer)


def read_answer(kind: QueryKind, doc: Mapping[str, Any]) -> QueryAnswer:
    """A success answer's JSON (decoded) as its typed Struct; ValueError when it does not
    fit (keys a newer agent adds are ignored)."""
    try:
        answer: QueryAnswer = msgspec.convert(dict(doc), ANSWER_TYPES[kind])
    except msgspec.ValidationError as exc:
        raise ValueError(f"malformed {kind.value} answer: {exc}") from None
    return answer
