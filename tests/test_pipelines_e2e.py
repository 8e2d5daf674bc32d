"""Pipelines through a real agent: PNG images in over MQTT (binary BYTES), labels out."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from bench.models import DigitsModel, build_digits
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InvalidArgument
from tests.broker import Broker
from tests.helpers import deploy, running_agent

DEVICE = "gw-pipe"
# The digits' 0..16 pixels travel as round(v * 255 / 16) in 8-bit PNGs and are scaled back.
SETTINGS = {"color": "L", "size": [8, 8], "scale": 16 / 255, "top_k": 3}


def png(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(row.reshape(8, 8) * 255 / 16).astype(np.uint8), "L").save(
        buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, DigitsModel]]:
    root = tmp_path_factory.mktemp("pipe")
    with running_agent(root, DEVICE, log={"level": "INFO"}) as (broker, _):
        digits = build_digits(root / "models")
        settings = root / "settings.json"
        settings.write_text(json.dumps(SETTINGS))
        assert deploy(broker.url, root, "--model", "digits-img", "--version", "1", "--file",
                      str(digits.path), "--task", "image-classification", "--settings",
                      str(settings), "--wait", "60", device=DEVICE) == 0
        yield broker, digits


def test_png_digits_through_the_agent_match_scikit_learn(
    stack: tuple[Broker, DigitsModel],
) -> None:
    broker, digits = stack
    images = [png(row) for row in digits.x_test]
    with InferenceClient(broker.url) as client:
        futures = [client.submit("digits-img", {"image": np.array([img], dtype=object)},
                                 device=DEVICE, binary=True, timeout=30) for img in images[:200]]
        results = [f.result(60) for f in futures]
    pred = np.array([int(r.outputs["classes"][0][0]) for r in results])
    assert (pred == digits.sklearn_pred[:200]).mean() >= 0.99
    assert (pred == digits.y_test[:200]).mean() == pytest.approx(
        (digits.sklearn_pred[:200] == digits.y_test[:200]).mean(), abs=0.01)
    first = results[0]
    assert first.outputs["labels"][0][0] in (str(pred[0]), str(pred[0]).encode())
    assert first.outputs["scores"].shape == (1, 3)


def test_bad_image_is_invalid_argument_and_next_works(stack: tuple[Broker, DigitsModel]) -> None:
    broker, digits = stack
    good = png(digits.x_test[0])
    with InferenceClient(broker.url) as client:
        with pytest.raises(InvalidArgument, match="digits-img"):
            client.infer("digits-img", {"image": np.array([good[:20]], dtype=object)},
                         device=DEVICE, binary=True, timeout=30)
        with pytest.raises(InvalidArgument):
            client.infer("digits-img", {"image": np.array([b"not an image"], dtype=object)},
                         device=DEVICE, binary=True, timeout=30)
        ok = client.infer("digits-img", {"image": np.array([good], dtype=object)},
                          device=DEVICE, binary=True, timeout=30)
    assert int(ok.outputs["classes"][0][0]) == int(digits.sklearn_pred[0])
