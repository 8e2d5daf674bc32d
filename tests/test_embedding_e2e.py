"""Embeddings through a real agent: the encoder deployed with its tokenizer.json (the
manifest's `files`), texts sent as BYTES (binary and JSON), the same vectors as the pipeline
run locally; token ids still accepted; bad texts answered INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench.models import EncoderModel, build_encoder, build_wordpiece_tokenizer
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InvalidArgument
from edgeinfer.runtimes.base import LoadOptions
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT
from edgeinfer.runtimes.pipelines import build_pipeline
from tests.broker import Broker
from tests.helpers import deploy, running_agent

tokenizers = pytest.importorskip("tokenizers", reason="pip install 'edgeinfer[media]'")

DEVICE = "gw-embed"
TEXTS = ["Edge gateways run inference close to the sensors.", "the fleet",
         "A tokenizer turns text into token ids."]


@dataclass(frozen=True)
class Stack:
    broker: Broker
    enc: EncoderModel
    folder: Path  # encoder.onnx beside tokenizer.json, as the agent's version folder has them


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("embed")
    folder = root / "model"
    tok_path = build_wordpiece_tokenizer(folder, [*TEXTS, "Jobs travel over MQTT to the agent."])
    vocab = tokenizers.Tokenizer.from_file(str(tok_path)).get_vocab_size()
    enc = build_encoder(folder, vocab=vocab)
    with running_agent(root, DEVICE, log={"level": "INFO"}) as (broker, _):
        assert deploy(broker.url, root, "--model", "embed", "--version", "1", "--file",
                      str(enc.path), "--task", "embedding", "--with", f"tokenizer.json={tok_path}",
                      "--prefer", "onnxruntime", "--wait", "120", device=DEVICE) == 0
        yield Stack(broker, enc, folder)


def local(s: Stack, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ORT.load(s.enc.path, "CPU", LoadOptions())
    out: np.ndarray = build_pipeline("embedding", {}, s.folder, session).run(session, inputs)["embedding"]
    return out


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_texts_through_the_agent_equal_the_pipeline_run_locally(stack: Stack, binary: bool) -> None:
    texts = np.array([t.encode() for t in TEXTS], dtype=object)
    with InferenceClient(stack.broker.url) as client:
        result = client.infer("embed", {"text": texts}, device=DEVICE, binary=binary, timeout=60)
    got = np.asarray(result.outputs["embedding"], dtype=np.float32)
    assert got.shape == (3, 16)
    np.testing.assert_allclose(got, local(stack, {"text": texts}), rtol=1e-5, atol=1e-6)
    assert result.parameters["runtime"] == "onnxruntime"


def test_token_ids_still_work_and_bad_texts_are_invalid(stack: Stack) -> None:
    tok = tokenizers.Tokenizer.from_file(str(stack.folder / "tokenizer.json"))
    ids = np.array([tok.encode(TEXTS[1]).ids], dtype=np.int64)
    mask = np.ones_like(ids)
    with InferenceClient(stack.broker.url) as client:
        by_ids = client.infer("embed", {"input_ids": ids, "attention_mask": mask}, device=DEVICE,
                              binary=True, timeout=60)
        by_text = client.infer("embed", {"text": np.array([TEXTS[1].encode()], dtype=object)},
                               device=DEVICE, binary=True, timeout=60)
        np.testing.assert_allclose(by_ids.outputs["embedding"], by_text.outputs["embedding"],
                                   rtol=1e-6, atol=1e-7)
        with pytest.raises(InvalidArgument, match=r"input text\[1\] is empty"):
            client.infer("embed", {"text": np.array([b"fine", b""], dtype=object)},
                         device=DEVICE, binary=True, timeout=60)
        with pytest.raises(InvalidArgument, match=r"input text\[0\] is not UTF-8"):
            client.infer("embed", {"text": np.array([b"caf\xe9"], dtype=object)},
                         device=DEVICE, binary=True, timeout=60)
        with pytest.raises(InvalidArgument, match="missing input 'attention_mask'"):
            client.infer("embed", {"input_ids": ids}, device=DEVICE, binary=True, timeout=60)
        ok = client.infer("embed", {"text": np.array([b"the fleet"], dtype=object)},
                          device=DEVICE, binary=True, timeout=60)
    assert ok.outputs["embedding"].shape == (1, 16)
