"""The image-to-text task through a real agent: the tiny VLM's two models (encoder.onnx as the
entry's artifact, decoder.onnx beside it with the tokenizer and config.json) deployed with
`edge-fleet deploy --with`, a PNG digit and a prompt in, the caption streamed back in chunks
and equal to the independent numpy model's greedy caption; a bad image refused."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from bench.tinyvlm import PROMPTS, TinyVlm, caption
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InvalidArgument
from tests.broker import Broker
from tests.helpers import blobs, deploy, running_agent, to_png

DEVICE = "gw-vlm"
DESCRIBE = list(PROMPTS)[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_vlm: TinyVlm) -> Iterator[Broker]:
    root = tmp_path_factory.mktemp("vlm")
    folder = tiny_vlm.model_dir
    with running_agent(root, DEVICE) as (broker, _):
        assert deploy(broker.url, root, "--model", "vlm", "--version", "1", "--task", "image-to-text",
                      "--file", str(folder / "encoder.onnx"),
                      "--with", f"decoder.onnx={folder / 'decoder.onnx'}",
                      "--with", f"tokenizer.json={folder / 'tokenizer.json'}",
                      "--with", f"config.json={folder / 'config.json'}",
                      "--prefer", "onnxruntime", "--wait", "120", device=DEVICE) == 0
        yield broker


def test_streamed_caption_equals_the_numpy_model(stack: Broker, tiny_vlm: TinyVlm) -> None:
    digits = list(tiny_vlm.holdout_digits)
    pixels = tiny_vlm.holdout_pixels[digits.index(4)]
    grey = np.rint(pixels * 255)
    want = tiny_vlm.greedy(grey / 255, DESCRIBE)  # the pixels the PNG carries
    inputs = {"image": blobs(to_png(grey.reshape(8, 8))),
              "text_input": np.array([DESCRIBE.encode()], dtype=object)}
    with InferenceClient(stack.url) as client:
        parts = list(client.stream("vlm", inputs, device=DEVICE, binary=True,
                                   parameters={"stream": True}, timeout=60))
        with pytest.raises(InvalidArgument, match=r"input image\[0\]: could not decode the PNG image"):
            client.infer("vlm", {**inputs, "image": blobs(inputs["image"][0][:20])}, device=DEVICE,
                         binary=True, timeout=30)
    assert len(parts) > 2  # one chunk per word, then the end
    assert [p.parameters.get("sequence_end") for p in parts] == [False] * (len(parts) - 1) + [True]
    assert [bytes(p.outputs["finish_reason"][0]) for p in parts][-1] == b"eos"
    ids = np.concatenate([p.outputs["token_ids"] for p in parts]).tolist()
    text = b"".join(bytes(p.outputs["text_output"][0]) for p in parts).decode()
    assert ids == want
    assert text == tiny_vlm.tokenizer().decode(want) == caption(DESCRIBE, 4)
