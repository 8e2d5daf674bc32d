"""Text generation through a real agent: the tokenizer installed beside the model, greedy
answers, streamed chunks with sequence_end, and cancellation by job id."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from bench.tinylm import TinyLm
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.runtimes.base import LoadOptions
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT
from edgeinfer.runtimes.pipelines import build_pipeline
from tests.broker import Broker
from tests.helpers import deploy, running_agent

DEVICE = "gw-text"
PROMPT = "Four score and"


def prompt(text: str, max_tokens: int = 40) -> dict[str, np.ndarray]:
    return {"text_input": np.array([text.encode()], dtype=object),
            "max_tokens": np.array([max_tokens], dtype=np.int32)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_lm: TinyLm
          ) -> Iterator[tuple[Broker, TinyLm]]:
    root = tmp_path_factory.mktemp("text")
    lm = tiny_lm
    with running_agent(root, DEVICE, log={"level": "INFO"}) as (broker, _):
        assert deploy(broker.url, root, "--model", "tiny-lm", "--version", "1", "--file",
                      str(lm.path), "--task", "text-generation",
                      "--with", f"tokenizer.json={lm.model_dir / 'tokenizer.json'}",
                      "--with", f"config.json={lm.model_dir / 'config.json'}",
                      "--prefer", "onnxruntime", "--wait", "120", device=DEVICE) == 0
        # OpenVINO generates this model ~10x slower than ONNX Runtime here: time to cancel.
        assert deploy(broker.url, root, "--model", "tiny-lm-ov", "--version", "1", "--file",
                      str(lm.path), "--task", "text-generation",
                      "--with", f"tokenizer.json={lm.model_dir / 'tokenizer.json'}",
                      "--with", f"config.json={lm.model_dir / 'config.json'}",
                      "--prefer", "openvino", "--wait", "120", device=DEVICE) == 0
        yield broker, lm


def reference(lm: TinyLm, text: str, max_tokens: int) -> bytes:
    session = ORT.load(lm.path, "CPU", LoadOptions())
    pipe = build_pipeline("text-generation", {}, lm.model_dir, session)
    return bytes(pipe.run(session, prompt(text, max_tokens))["text_output"][0])


def test_greedy_answer_equals_the_pipeline_run_locally(stack: tuple[Broker, TinyLm]) -> None:
    broker, lm = stack
    with InferenceClient(broker.url) as client:
        result = client.infer("tiny-lm", prompt(PROMPT), device=DEVICE, binary=True, timeout=60)
    text = result.outputs["text_output"][0]
    assert bytes(text) == reference(lm, PROMPT, 40)
    assert b"seven years ago" in bytes(text)  # the tiny model learned its text


def test_streamed_chunks_join_to_the_answer(stack: tuple[Broker, TinyLm]) -> None:
    broker, lm = stack
    with InferenceClient(broker.url) as client:
        parts = list(client.stream("tiny-lm", prompt(PROMPT), device=DEVICE, binary=True,
                                   parameters={"stream": True}, timeout=60))
    assert len(parts) > 1
    assert [p.parameters.get("sequence_end") for p in parts] == [False] * (len(parts) - 1) + [True]
    joined = b"".join(bytes(p.outputs["text_output"][0]) for p in parts)
    assert joined == reference(lm, PROMPT, 40)


def test_cancel_stops_a_running_job(stack: tuple[Broker, TinyLm]) -> None:
    broker, _ = stack
    with InferenceClient(broker.url) as client:
        stream = client.stream("tiny-lm-ov", prompt("Call me", max_tokens=100), device=DEVICE,
                               binary=True, job_id="long-1", parameters={"stream": True},
                               timeout=60)
        parts = [next(stream)]  # it runs: a chunk came, and up to 100 tokens are to come
        ack = client.publish_raw(
            f"edge/v1/dev/{DEVICE}/jobs",
            json.dumps({"id": "cancel-1", "inputs": [],
                        "parameters": {"cancel": "long-1"}}).encode(),
            response_topic=client.reply_topic, timeout=30)
        parts.extend(stream)
        answer = ack.result(30)
    assert answer["id"] == "cancel-1" and answer["parameters"] == {"cancel": "long-1",
                                                                   "found": True}
    assert bytes(parts[-1].outputs["finish_reason"][0]) == b"cancelled"
    assert parts[-1].parameters["sequence_end"] is True
    tokens = sum(len(p.outputs["token_ids"]) for p in parts)
    assert tokens < 100
