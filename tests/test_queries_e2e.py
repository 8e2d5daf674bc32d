"""OIP's health and metadata queries against a real agent (issue 14, point 1).

One mosquitto and one edge-agent process (one worker, in a pool) serve the module, with
two models deployed through the fleet CLI: scikit-learn's digits MLP (x FP32 [N, 64] ->
label INT64 [N], probabilities FP32 [N, 10]), whose metadata is compared with what ONNX
Runtime itself says of the file, and a slow model that fills the job queue.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from bench.models import DigitsModel
from edgeinfer.contract.queries import QUERY_PROPERTY, ModelMetadata
from edgeinfer.contract.topics import Topics
from edgeinfer.fleet.cli import main
from edgeinfer.fleet.client import AsyncInferenceClient, InferenceClient, InferResult, NotFound
from tests.broker import Broker
from tests.helpers import build_slow, deploy, reported, running_agent

DEVICE = "gw-meta"
POOL = "meta-pool"
# ONNX Runtime's element types, as OIP names them.
_OIP = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           digits: DigitsModel) -> Iterator[tuple[Broker, Any]]:
    root = tmp_path_factory.mktemp("meta")
    with running_agent(root, DEVICE, jobs={"workers": 1, "pools": [POOL]}) as (broker, agent):
        slow = build_slow(root / "models", matmuls=8, size=1024)  # ~50 ms a job
        for name, path in (("digits", digits.path), ("slow", slow)):
            assert deploy(broker.url, root, "--model", name, "--version", "1", "--file",
                          str(path), "--prefer", "onnxruntime", "--wait", "60",
                          device=DEVICE) == 0
        yield broker, agent


@pytest.fixture(scope="module")
def client(served: tuple[Broker, Any]) -> Iterator[InferenceClient]:
    with InferenceClient(served[0].url) as c:
        yield c


def _tensors(args: list[Any]) -> list[dict[str, Any]]:
    """ONNX Runtime's own description of a model's inputs or outputs, in OIP's terms."""
    return [{"name": a.name, "datatype": _OIP[a.type],
             "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]


@pytest.fixture(scope="module")
def truth(digits: DigitsModel) -> dict[str, list[dict[str, Any]]]:
    session = ort.InferenceSession(str(digits.path), providers=["CPUExecutionProvider"])
    found = {"inputs": _tensors(session.get_inputs()), "outputs": _tensors(session.get_outputs())}
    # What the test stands on: a dynamic batch dimension and two datatypes.
    assert found["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    assert {t["datatype"] for t in found["outputs"]} == {"INT64", "FP32"}
    return found


def test_reported_lists_each_serving_model_s_task_inputs_and_outputs(
        served: tuple[Broker, Any], truth: dict[str, Any]) -> None:
    models = {m["name"]: m for m in reported(served[0].url, DEVICE)["models"]}
    entry = models["digits"]
    assert (entry["state"], entry["task"]) == ("serving", "tensor")
    assert (entry["inputs"], entry["outputs"]) == (truth["inputs"], truth["outputs"])
    assert models["slow"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 1]}]


def test_no_http_endpoint_without_http_listen(served: tuple[Broker, Any]) -> None:
    # The local KServe endpoint (tests/test_http_endpoint.py) is opt-in: this agent's
    # config has no `http` section, and it listens on no port at all.
    listening = [c.laddr for c in psutil.Process(served[1].proc.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert listening == []
    assert "KServe v2 endpoint" not in served[1].log_text()


def test_metadata_is_what_the_model_takes_and_returns(
        client: InferenceClient, truth: dict[str, Any]) -> None:
    meta = client.metadata("digits", device=DEVICE, timeout=10)
    assert isinstance(meta, ModelMetadata)
    assert (meta.name, meta.versions, meta.platform) == ("digits", ["1"], "onnxruntime_onnx")
    as_json = [[{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in ts]
               for ts in (meta.inputs, meta.outputs)]
    assert as_json == [truth["inputs"], truth["outputs"]]
    # A job built from the metadata alone runs.
    x = np.zeros([1 if d == -1 else d for d in meta.inputs[0].shape], np.float32)
    result = client.infer("digits", {meta.inputs[0].name: x}, device=DEVICE)
    assert set(result.outputs) == {t.name for t in meta.outputs}
    assert client.metadata("digits", device=DEVICE, version="1") == meta
    with pytest.raises(NotFound, match=r"model 'digits' has no version '9' here \(versions: 1\)"):
        client.metadata("digits", device=DEVICE, version="9")


def test_readiness_of_the_server_and_of_models(client: InferenceClient) -> None:
    assert client.ready(device=DEVICE) is True
    assert client.ready("digits", device=DEVICE) is True
    with pytest.raises(NotFound, match=r"model 'nope' is not served here \(serving: digits, slow\)"):
        client.ready("nope", device=DEVICE)
    # The pool's jobs topic takes them too (the agent's pool session).
    assert client.ready("digits", pool=POOL) is True


def test_the_async_client_asks_the_same(served: tuple[Broker, Any],
                                        truth: dict[str, Any]) -> None:
    async def ask() -> tuple[ModelMetadata, bool, bool]:
        async with AsyncInferenceClient(served[0].url) as c:
            return (await c.metadata("digits", device=DEVICE), await c.ready(device=DEVICE),
                    await c.ready("digits", device=DEVICE))

    meta, server, model = asyncio.run(ask())
    assert [t.name for t in meta.outputs] == [t["name"] for t in truth["outputs"]]
    assert (server, model) == (True, True)


def test_a_query_is_answered_ahead_of_queued_jobs_and_never_journaled(
        served: tuple[Broker, Any], client: InferenceClient) -> None:
    # One worker, ten jobs of ~50 ms: the queue holds them for half a second or more.
    jobs: list[Future[InferResult]] = [
        client.submit("slow", {"x": np.ones((1, 1), np.float32)}, device=DEVICE, timeout=60)
        for _ in range(10)]
    assert client.ready("slow", device=DEVICE, timeout=10) is True
    answered_before = sum(f.done() for f in jobs)
    for f in jobs:
        f.result(60)
    assert answered_before <= 3, f"{answered_before} of 10 queued jobs were answered first"
    # Queries leave no row in the journal (jobs are rows keyed by their reply topic and id).
    db = sqlite3.connect(f"file:{served[1].state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        keys = [k for (k,) in db.execute("SELECT key FROM jobs")]
    finally:
        db.close()
    assert keys and all("|q-" not in k for k in keys), keys


def test_a_malformed_query_is_answered_invalid_argument(client: InferenceClient) -> None:
    answer = client.publish_raw(
        Topics("edge/v1", DEVICE).jobs, b'{"id": "q-bad", "model_name": "digits", "inputs": []}',
        user_properties=[(QUERY_PROPERTY, "ModelMetadata")]).result(15)
    assert answer["id"] == "q-bad" and answer["parameters"] == {"code": "INVALID_ARGUMENT"}
    assert "key 'inputs'" in answer["error"]


def test_the_cli_prints_the_metadata(served: tuple[Broker, Any], truth: dict[str, Any],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["models", "describe", "--broker", served[0].url, "--device", DEVICE,
            "--model", "digits"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "digits: versions 1; platform onnxruntime_onnx"
    assert lines[1].split() == ["NAME", "DATATYPE", "SHAPE"]
    assert lines[2].split() == ["input", "x", "FP32", "[-1,", "64]"]
    assert [line.split()[:3] for line in lines[3:]] == [
        ["output", t["name"], t["datatype"]] for t in truth["outputs"]]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == truth["inputs"]
    assert main([*argv[:-1], "nope"]) == 1
    assert "NOT_FOUND: model 'nope' is not served here" in capsys.readouterr().err

