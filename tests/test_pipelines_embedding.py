"""The embedding pipeline on a small encoder: mean pooling under the attention mask and
L2 normalisation against numpy, on ONNX Runtime and OpenVINO; no mask, CLS pooling, no
normalisation; an output the model lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import EncoderModel, build_encoder
from edgeinfer.runtimes.base import LoadOptions, TensorSpec
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import build_pipeline

OPTS = LoadOptions(threads=1)
# ORT and OpenVINO (CPU held to f32) differ only by summation order: as in test_runtimes.
RTOL, ATOL = 1e-4, 1e-5


def _numpy_embedding(enc: EncoderModel, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    m = np.ones(ids.shape, np.float32) if mask is None else mask.astype(np.float32)
    hidden = np.tanh(enc.embeddings[ids] @ enc.weight + m[..., None] * enc.mask_bias)
    pooled = (hidden * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    out: np.ndarray = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("backend", [ORT_CPU, OPENVINO], ids=["onnxruntime", "openvino"])
def test_embedding_matches_numpy(model_dir: Path, backend: Any) -> None:
    enc = build_encoder(model_dir)
    session = backend.load(enc.path, "CPU", OPTS)
    pipe = build_pipeline("embedding", {}, None, session)
    assert [s.name for s in pipe.inputs()] == ["input_ids", "attention_mask"]
    assert pipe.outputs() == [TensorSpec("embedding", "FP32", (-1, 16))]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (4, 7)).astype(np.int64)
    mask = np.ones((4, 7), np.int64)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = 0  # padding token
    got = pipe.run(session, {"input_ids": ids, "attention_mask": mask})["embedding"]
    assert got.shape == (4, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, _numpy_embedding(enc, ids, mask), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    # Padding does not change a sequence's vector.
    short = pipe.run(session, {"input_ids": ids[1:2, :4], "attention_mask": mask[1:2, :4]})
    np.testing.assert_allclose(short["embedding"][0], got[1], rtol=RTOL, atol=ATOL)


def test_embedding_without_mask_cls_and_unnormalised(model_dir: Path) -> None:
    enc = build_encoder(model_dir, "encoder_nomask.onnx", with_mask=False)
    session = ORT_CPU.load(enc.path, "CPU", OPTS)
    ids = np.random.default_rng(1).integers(0, 100, (3, 5)).astype(np.int64)
    got = build_pipeline("embedding", {}, None, session).run(session, {"input_ids": ids})
    np.testing.assert_allclose(got["embedding"], _numpy_embedding(enc, ids, None), rtol=RTOL, atol=ATOL)
    hidden = np.tanh(enc.embeddings[ids] @ enc.weight)
    cls = build_pipeline("embedding", {"pooling": "cls", "normalize": False}, None, session)
    np.testing.assert_allclose(cls.run(session, {"input_ids": ids})["embedding"], hidden[:, 0],
                               rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="no output 'pooled'; it has last_hidden_state"):
        build_pipeline("embedding", {"output": "pooled"}, None, session)
