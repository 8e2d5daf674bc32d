"""OIP's health and metadata queries, in-process: the codec both sides share
(edgeinfer/contract/queries.py), the SDK's reading of answers (fleet/oip.py), the agent's
answers (agent/queries.py) over a registry with a fake session, and `reported`'s new
model fields. tests/test_queries_e2e.py asks a real agent."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

import edgeinfer
from edgeinfer.agent.mqtt_session import Inbound
from edgeinfer.agent.queries import Queries
from edgeinfer.agent.served import ServedModels, ServingModel
from edgeinfer.contract import documents
from edgeinfer.contract.documents import ModelEntry, TensorMetadata
from edgeinfer.contract.errors import Code
from edgeinfer.contract.manifest import ModelSpec
from edgeinfer.contract.queries import (
    QUERY_PROPERTY,
    ModelMetadata,
    ModelReady,
    QueryError,
    QueryKind,
    ServerReady,
    decode_query,
    encode_query,
    query_kind,
    read_answer,
)
from edgeinfer.fleet.errors import Internal, NotFound
from edgeinfer.fleet.oip import answer_from_response
from edgeinfer.runtimes.base import TensorSpec

REPLY = "edge/v1/reply/c1/res"
RESULTS = "edge/v1/dev/gw/results"

# -- the codec ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(QueryKind))
def test_a_query_the_sdk_encodes_decodes_to_the_same_query(kind: QueryKind) -> None:
    model = "digits" if kind.about_a_model else None
    version = "3" if kind.about_a_model else None
    payload, props = encode_query(kind, query_id="q-1", model=model, version=version)
    assert props == [(QUERY_PROPERTY, kind.value)]
    query = decode_query(kind.value, payload, props)
    assert (query.kind, query.id, query.model_name, query.model_version) == (
        kind, "q-1", model, version)


def test_the_model_may_be_named_by_user_properties_and_the_body_may_be_empty() -> None:
    props = ((QUERY_PROPERTY, "ModelMetadata"), ("model_name", "digits"),
             ("model_version", "2"))
    query = decode_query("ModelMetadata", b"", props)
    assert (query.id, query.model_name, query.model_version) == (None, "digits", "2")
    assert decode_query("ServerLive", b"  ", ()).kind is QueryKind.SERVER_LIVE


def test_only_the_query_property_marks_a_query() -> None:
    assert query_kind((("Inference-Header-Content-Length", "10"),)) is None
    assert query_kind((("model_name", "m"), (QUERY_PROPERTY, "ModelReady"))) == "ModelReady"


@pytest.mark.parametrize(("kind", "payload", "props", "words"), [
    ("ModelInfer", b"", (),
     "'ModelInfer' is none of ServerLive, ServerReady, ServerMetadata, ModelReady"),
    ("ModelReady", b"{}", (), "ModelReady needs a model: set model_name"),
    ("ModelReady", b'{"model_name": "a b"}', (), "model_name must match"),
    ("ModelMetadata", b'{"model_name": "m", "model_version": "1/2"}', (),
     "model_version must match"),
    ("ModelMetadata", b'{"model_name": "m", "inputs": []}', (), "key 'inputs'"),
    ("ModelMetadata", b'{"model_name": 5}', (), "key 'model_name'"),
    ("ServerReady", b"", (("model_name", "m"),), "ServerReady is about the server"),
    ("ServerLive", b"[1", (), "this is no JSON"),
    ("ServerLive", b'{"id": "a b"}', (), "id must match"),
])
def test_a_malformed_query_is_refused_naming_the_problem(
        kind: str, payload: bytes, props: tuple[tuple[str, str], ...], words: str) -> None:
    with pytest.raises(QueryError, match=words) as caught:
        decode_query(kind, payload, props)
    assert caught.value.code is Code.INVALID_ARGUMENT


def test_the_query_id_comes_back_in_an_error_once_it_could_be_read() -> None:
    with pytest.raises(QueryError) as caught:
        decode_query("ModelReady", b'{"id": "q-7"}', ())
    assert caught.value.id == "q-7"
    with pytest.raises(QueryError) as caught:
        decode_query("ModelReady", b'{"id": "q-8", "model_name": "m", "outputs": []}', ())
    assert caught.value.id == "q-8"


def test_the_sdk_refuses_to_encode_a_query_the_agent_would_refuse() -> None:
    with pytest.raises(ValueError, match="needs a model"):
        encode_query(QueryKind.MODEL_METADATA)
    with pytest.raises(ValueError, match="names no model"):
        encode_query(QueryKind.SERVER_READY, model="m")
    with pytest.raises(ValueError, match="model_name 'a b' must match"):
        encode_query(QueryKind.MODEL_READY, model="a b")


def test_answers_read_typed_and_errors_raise_their_code() -> None:
    meta = {"name": "m", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], "outputs": [],
            "added_by_a_newer_agent": 1}
    got = answer_from_response(QueryKind.MODEL_METADATA, meta)
    assert got == ModelMetadata("m", ["1"], "onnxruntime_onnx",
                                [TensorMetadata("x", "FP32", [-1, 4])], [])
    with pytest.raises(NotFound, match="not served") as caught:
        answer_from_response(QueryKind.MODEL_READY, {
            "id": "q-1", "error": "model 'x' is not served here",
            "parameters": {"code": "NOT_FOUND"}})
    assert caught.value.job_id == "q-1"
    with pytest.raises(Internal, match="malformed ModelReady answer"):
        answer_from_response(QueryKind.MODEL_READY, {"ready": "yes"})
    with pytest.raises(ValueError, match="malformed ServerReady"):
        read_answer(QueryKind.SERVER_READY, {})


# -- reported's new fields --------------------------------------------------------------


def test_reported_model_fields_are_optional_both_ways() -> None:
    # An older agent's entry reads, without the fields; a loading entry leaves them out.
    old = documents.read_reported(b'{"models": [{"name": "m", "version": "1"}]}')
    assert old is not None and old.models[0].inputs is msgspec.UNSET
    assert "inputs" not in json.loads(documents.encode(ModelEntry("m", "1", state="loading")))
    entry = ModelEntry("m", "1", state="serving", task="tensor",
                       inputs=[TensorMetadata("x", "FP32", [-1, 4])],
                       outputs=[TensorMetadata("y", "FP32", [-1, 4])])
    back = documents.read_reported(documents.encode(documents.Reported(models=[entry])))
    assert back is not None and back.models[0] == entry


# -- the agent's answers ------------------------------------------------------------------


class _Session:
    runtime = "openvino"
    device = "CPU"
    inputs = [TensorSpec("x", "FP32", (-1, 4))]
    outputs = [TensorSpec("y", "INT64", (-1,))]

    def infer(self, inputs: Any, outputs: Any = None) -> Any:
        raise AssertionError("a query never runs the model")

    def close(self) -> None:
        pass


def _served(*versions: str) -> ServedModels:
    registry = ServedModels()
    registry.replace([ServingModel(msgspec.convert(
        {"name": "m", "version": v, "uri": "file:///m", "sha256": "ab" * 32, "size": 1},
        ModelSpec), _Session(), []) for v in versions])
    return registry


class _Desk:
    """Queries over a registry, with what it sends and acknowledges recorded."""

    def __init__(self, registry: ServedModels, statuses: list[ModelEntry]) -> None:
        self.sent: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.acks: list[int] = []
        self.taking = True
        self.queries = Queries(
            registry, lambda: statuses, lambda: self.taking,
            lambda topic, payload, corr, props: self.sent.append(
                (topic, json.loads(payload), corr)),
            lambda mid, qos: self.acks.append(mid), RESULTS, ["edge/v1/reply/"])

    def ask(self, kind: str, body: dict[str, Any] | None = None, *, mid: int = 1,
            reply: str = REPLY, props: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
        inbound = Inbound("edge/v1/dev/gw/jobs", json.dumps(body or {}).encode(), 1, False,
                          reply, b"corr", ((QUERY_PROPERTY, kind), *props), None, 0.0, 0.0, mid)
        assert self.queries.answered(inbound)
        topic, answer, corr = self.sent[-1]
        assert (corr, self.acks[-1]) == (b"corr", mid)
        assert topic == (REPLY if reply == REPLY else RESULTS)
        return answer


def test_model_metadata_is_the_served_version_s_tensors() -> None:
    desk = _Desk(_served("1", "2"), [])
    assert desk.ask("ModelMetadata", {"model_name": "m"}) == {
        "name": "m", "versions": ["1", "2"], "platform": "openvino",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}]}
    missing = desk.ask("ModelMetadata", {"id": "q-2", "model_name": "m", "model_version": "9"})
    assert missing == {"id": "q-2", "error": "model 'm' has no version '9' here (versions: "
                       "1, 2)", "parameters": {"code": "NOT_FOUND"}}


def test_model_ready_is_false_while_a_told_version_loads_and_not_found_for_a_stranger() -> None:
    statuses = [ModelEntry("m", "1", state="serving"), ModelEntry("m", "2", state="loading")]
    desk = _Desk(_served("1"), statuses)
    assert desk.ask("ModelReady", {"model_name": "m"}) == {"name": "m", "ready": True}
    assert desk.ask("ModelReady", {"model_name": "m", "model_version": "2"}) == {
        "name": "m", "ready": False}
    stranger = desk.ask("ModelReady", props=(("model_name", "other"),))
    assert stranger["parameters"] == {"code": "NOT_FOUND"}
    assert "model 'other' is not served here (serving: m)" in stranger["error"]
    # Server ready: every version told serves, and jobs are taken.
    assert desk.ask("ServerReady") == {"ready": False}
    statuses[1] = ModelEntry("m", "2", state="serving")
    assert desk.ask("ServerReady") == {"ready": True}
    desk.taking = False  # draining before a stop
    assert desk.ask("ServerReady") == {"ready": False}
    assert desk.ask("ServerLive") == {"live": True}
    assert desk.ask("ServerMetadata") == {"name": "edgeinfer", "version": edgeinfer.__version__,
                                          "extensions": ["binary_tensor_data"]}


def test_a_refused_response_topic_and_a_bad_query_get_their_errors() -> None:
    desk = _Desk(_served("1"), [])
    refused = desk.ask("ServerLive", reply="elsewhere/x")
    assert refused["parameters"] == {"code": "INVALID_ARGUMENT"}
    assert "response topic 'elsewhere/x' refused" in refused["error"]
    bad = desk.ask("ModelMetadata", {"id": "q-3"})
    assert bad["id"] == "q-3" and "needs a model" in bad["error"]


def test_a_job_is_no_query() -> None:
    desk = _Desk(_served("1"), [])
    job = Inbound("edge/v1/dev/gw/jobs", b'{"inputs": []}', 1, False, REPLY, b"c",
                  (("model_name", "m"),), None, 0.0, 0.0, 5)
    assert not desk.queries.answered(job)
    # One too large to read is left to the job path's refusal.
    big = Inbound("edge/v1/dev/gw/jobs", b"", 1, False, REPLY, b"c",
                  ((QUERY_PROPERTY, "ServerLive"),), None, 0.0, 0.0, 6, oversize=1 << 30)
    assert not desk.queries.answered(big)
    assert desk.sent == [] and desk.acks == []


def test_model_ready_answer_type() -> None:
    assert read_answer(QueryKind.MODEL_READY, {"name": "m", "ready": True}) == ModelReady(
        "m", True)
    assert read_answer(QueryKind.SERVER_READY, {"ready": False}) == ServerReady(False)


class _PixelSession(_Session):
    runtime = "onnxruntime"
    inputs = [TensorSpec("pixels", "FP32", (-1, 3, 4, 4))]
    outputs = [TensorSpec("scores", "FP32", (-1, 3))]


def test_a_pipeline_model_s_metadata_is_what_its_jobs_send_not_the_model_s_tensors() -> None:
    pytest.importorskip("PIL", reason="the image pipeline needs pillow: pip install 'edgeinfer[media]'")

    def spec(name: str, settings: dict[str, Any]) -> ModelSpec:
        return msgspec.convert({"name": name, "version": "1", "uri": "file:///m", "sha256": "ab" * 32,
                                "size": 1, "task": "image-classification", "settings": settings},
                               ModelSpec)

    registry = ServedModels()
    registry.replace([ServingModel(spec("cls", {}), _PixelSession(), []),
                      ServingModel(spec("broken", {"top_k": "five"}), _PixelSession(), [])])
    desk = _Desk(registry, [])
    meta = desk.ask("ModelMetadata", {"model_name": "cls"})
    assert (meta["platform"], meta["inputs"]) == (
        "onnxruntime_onnx", [{"name": "image", "datatype": "BYTES", "shape": [-1]}])
    assert [t["name"] for t in meta["outputs"]] == ["labels", "scores", "classes"]
    broken = desk.ask("ModelMetadata", {"model_name": "broken"})
    assert broken["parameters"] == {"code": "UNAVAILABLE"}
    assert "key 'top_k'" in broken["error"]
