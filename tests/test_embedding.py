"""The `embedding` pipeline with a tokenizer: texts in, vectors out, against a numpy reference
that tokenises each text on its own (the `tokenizers` library, no padding) and pools by hand;
token ids still accepted; truncation, fixed shapes, token type ids, bad texts, settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.models import EncoderModel, build_encoder, build_wordpiece_tokenizer
from edgeinfer.runtimes.base import LoadOptions, Session, TensorSpec
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import build_pipeline as _build
from edgeinfer.runtimes.pipelines.embedding import Embedding

tokenizers = pytest.importorskip("tokenizers", reason="pip install 'edgeinfer[media]'")

OPTS = LoadOptions(threads=1)
RTOL, ATOL = 1e-4, 1e-5  # ORT and OpenVINO (f32) differ only by summation order

TRAIN = (
    "Edge gateways run inference close to the sensors.",
    "The agent answers jobs over MQTT and reports its state to the fleet.",
    "A tokenizer turns text into token ids; the encoder turns ids into vectors.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
)
TEXTS = [
    "Edge gateways run inference.",
    "the fleet",
    "A tokenizer turns text into token ids; the encoder turns ids into vectors, close to the sensors.",
    "Ünïcode and zebras: unknown words!",
]


def build_pipeline(task: str, settings: dict[str, Any], folder: Path | None, session: Session) -> Embedding:
    pipe = _build(task, settings, folder, session)
    assert isinstance(pipe, Embedding)
    return pipe


def _texts(*items: str | bytes) -> np.ndarray:
    return np.array([t.encode() if isinstance(t, str) else t for t in items], dtype=object)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version's folder: encoder.onnx beside tokenizer.json, as the agent links them."""
    d = tmp_path_factory.mktemp("embedding")
    build_wordpiece_tokenizer(d, TRAIN)
    return d


@pytest.fixture(scope="module")
def tok(folder: Path) -> Any:
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def enc(folder: Path, tok: Any) -> EncoderModel:
    return build_encoder(folder, vocab=tok.get_vocab_size())


def _reference(enc: EncoderModel, tok: Any, texts: list[str], max_length: int | None = None,
               with_mask: bool = True) -> np.ndarray:
    """Each text alone: the tokenizer's ids (cut as the tokenizer itself cuts), the encoder in
    numpy, mean over the tokens, L2-normalised."""
    rows = []
    for text in texts:
        ids = tok.encode(text).ids
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:]  # [CLS] ... [SEP]: the end token is kept
        ids = np.asarray(ids)
        bias = enc.mask_bias if with_mask else 0.0
        hidden = np.tanh(enc.embeddings[ids] @ enc.weight + bias)
        pooled = hidden.mean(axis=0)
        rows.append(pooled / np.linalg.norm(pooled))
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("backend", [ORT_CPU, OPENVINO], ids=["onnxruntime", "openvino"])
def test_texts_match_numpy(folder: Path, tok: Any, enc: EncoderModel, backend: Any) -> None:
    session = backend.load(enc.path, "CPU", OPTS)
    pipe = build_pipeline("embedding", {}, folder, session)
    assert pipe.inputs() == []  # a job sends `text` or the token ids
    assert [(s.name, s.datatype, s.shape) for s in pipe.optional_inputs()] == [
        ("text", "BYTES", (-1,)), ("input_ids", "INT64", (-1, -1)), ("attention_mask", "INT64", (-1, -1))]
    got = pipe.run(session, {"text": _texts(*TEXTS)})["embedding"]
    assert got.shape == (4, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(enc, tok, TEXTS), rtol=RTOL, atol=ATOL)
    # One text alone (no padding) gives the same vector as inside the padded batch.
    alone = pipe.run(session, {"text": _texts(TEXTS[1])})["embedding"]
    np.testing.assert_allclose(alone[0], got[1], rtol=RTOL, atol=ATOL)
    # Python strings, as a direct caller may pass them, are taken as well.
    strs = pipe.run(session, {"text": np.array(TEXTS[:2], dtype=object)})["embedding"]
    np.testing.assert_allclose(strs, got[:2], rtol=RTOL, atol=ATOL)


def test_token_ids_still_work_beside_text(folder: Path, tok: Any, enc: EncoderModel) -> None:
    session = ORT_CPU.load(enc.path, "CPU", OPTS)
    pipe = build_pipeline("embedding", {}, folder, session)
    ids = [tok.encode(t).ids for t in TEXTS[:2]]
    width = max(map(len, ids))
    arr = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, row in enumerate(ids):
        arr[i, : len(row)] = row
        mask[i, : len(row)] = 1
    by_ids = pipe.run(session, {"input_ids": arr, "attention_mask": mask})["embedding"]
    by_text = pipe.run(session, {"text": _texts(*TEXTS[:2])})["embedding"]
    np.testing.assert_allclose(by_ids, by_text, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"missing input 'attention_mask': send text"):
        pipe.run(session, {"input_ids": arr})
    with pytest.raises(ValueError, match="send either text or the token ids, not both"):
        pipe.run(session, {"text": _texts("a"), "input_ids": arr, "attention_mask": mask})
    with pytest.raises(ValueError, match=r"missing input 'input_ids', 'attention_mask'"):
        pipe.run(session, {})


def test_truncation_and_max_length(folder: Path, tok: Any, enc: EncoderModel) -> None:
    session = ORT_CPU.load(enc.path, "CPU", OPTS)
    long = " ".join(TRAIN)
    assert len(tok.encode(long).ids) > 40
    cut = build_pipeline("embedding", {"max_length": 12}, folder, session)
    assert cut.max_length == 12
    got = cut.run(session, {"text": _texts(long, TEXTS[1])})["embedding"]
    np.testing.assert_allclose(got, _reference(enc, tok, [long, TEXTS[1]], max_length=12),
                               rtol=RTOL, atol=ATOL)
    feed, mask, real = cut.tokenize([long])[0]
    assert feed["input_ids"].shape == (1, 12) and real == 1 and mask.sum() == 12
    assert feed["input_ids"][0, -1] == tok.token_to_id("[SEP]")
    strict = build_pipeline("embedding", {"max_length": 12, "truncation": False}, folder, session)
    with pytest.raises(ValueError, match=r"input text\[0\] is \d+ tokens long, over max_length 12 "
                                         r"\(truncation is off"):
        strict.run(session, {"text": _texts(long)})
    assert strict.run(session, {"text": _texts(TEXTS[1])})["embedding"].shape == (1, 16)
    # Without the setting, the tokenizer.json's own truncation (MiniLM's says 128) holds.
    d = folder / "own-max"
    d.mkdir()
    own_tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    own_tok.enable_truncation(9)
    own_tok.save(str(d / "tokenizer.json"))
    own = build_pipeline("embedding", {}, d, session)
    assert own.max_length == 9
    np.testing.assert_allclose(own.run(session, {"text": _texts(long)})["embedding"],
                               _reference(enc, tok, [long], max_length=9), rtol=RTOL, atol=ATOL)
    assert build_pipeline("embedding", {}, folder, session).max_length == 512


def test_bad_texts_are_refused_and_the_next_call_works(folder: Path, enc: EncoderModel) -> None:
    session = ORT_CPU.load(enc.path, "CPU", OPTS)
    pipe = build_pipeline("embedding", {}, folder, session)
    bad: dict[str, tuple[np.ndarray, str]] = {
        "empty": (_texts("fine", b""), r"input text\[1\] is empty"),
        "not UTF-8": (_texts(b"\xff\xfe caf\xe9"), r"input text\[0\] is not UTF-8 text"),
        "no texts": (np.array([], dtype=object), "input text holds no texts"),
        "a number": (np.array([3], dtype=object), "must hold UTF-8 text as bytes, got int"),
    }
    for name, (texts, reason) in bad.items():
        with pytest.raises(ValueError, match=reason):
            pipe.run(session, {"text": texts})
        assert pipe.run(session, {"text": _texts("the fleet")})["embedding"].shape == (1, 16), name
    plain = build_pipeline("embedding", {"add_special_tokens": False}, folder, session)
    with pytest.raises(ValueError, match=r"input text\[0\] gives no tokens"):
        plain.run(session, {"text": _texts("   ")})


def _bert_like(path: Path, vocab: int, dim: int, shape: list[int | str], dtype: int) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids (of `dtype`, `shape`) -> last_hidden_state
    = tanh(E[ids] + Ty[types] + mask * b): the three inputs a BERT export takes."""
    rng = np.random.default_rng(7)
    w = {"E": rng.standard_normal((vocab, dim)).astype(np.float32),
         "Ty": rng.standard_normal((2, dim)).astype(np.float32),
         "b": rng.standard_normal(dim).astype(np.float32)}
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Cast", ["token_type_ids"], ["types64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["E", "ids64"], ["tok"], axis=0),
        helper.make_node("Gather", ["Ty", "types64"], ["typ"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["mask3", "b"], ["shift"]),
        helper.make_node("Sum", ["tok", "typ", "shift"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "bert_like",
        [helper.make_tensor_value_info(n, dtype, shape)
         for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*shape, dim])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()]
        + [numpy_helper.from_array(np.array([-1], np.int64), "last")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return w


def test_token_types_int32_and_a_fixed_shape(folder: Path, tok: Any) -> None:
    """A model fixed at [2, 16] with INT32 inputs: three texts go as two calls of two (the last
    filled up and the copy dropped), each padded to 16; token type ids are fed."""
    path = folder / "bert_fixed.onnx"
    w = _bert_like(path, tok.get_vocab_size(), 8, [2, 16], TensorProto.INT32)
    session = ORT_CPU.load(path, "CPU", OPTS)
    pipe = build_pipeline("embedding", {}, folder, session)
    assert pipe.max_length == 16  # capped at the model's sequence length
    calls = pipe.tokenize(TEXTS[:3])
    assert [(c[0]["input_ids"].shape, c[0]["input_ids"].dtype, c[2]) for c in calls] == [
        ((2, 16), np.dtype(np.int32), 2), ((2, 16), np.dtype(np.int32), 1)]
    assert set(calls[0][0]) == {"input_ids", "attention_mask", "token_type_ids"}
    got = pipe.run(session, {"text": _texts(*TEXTS[:3])})["embedding"]
    want = []
    for text in TEXTS[:3]:
        ids = tok.encode(text).ids
        ids = ids[:15] + ids[-1:] if len(ids) > 16 else ids
        hidden = np.tanh(w["E"][ids] + w["Ty"][0] + w["b"])
        pooled = hidden.mean(axis=0)
        want.append(pooled / np.linalg.norm(pooled))
    np.testing.assert_allclose(got, np.stack(want), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="max_length 20 is over the model's fixed sequence length 16"):
        build_pipeline("embedding", {"max_length": 20}, folder, session)


def test_a_model_without_mask_gets_one_text_per_call(folder: Path, tok: Any) -> None:
    enc = build_encoder(folder, "encoder_nomask.onnx", vocab=tok.get_vocab_size(), with_mask=False)
    session = ORT_CPU.load(enc.path, "CPU", OPTS)
    pipe = build_pipeline("embedding", {}, folder, session)
    calls = pipe.tokenize(TEXTS)
    assert [c[0]["input_ids"].shape for c in calls] == [(1, len(tok.encode(t).ids)) for t in TEXTS]
    got = pipe.run(session, {"text": _texts(*TEXTS)})["embedding"]
    np.testing.assert_allclose(got, _reference(enc, tok, TEXTS, with_mask=False), rtol=RTOL, atol=ATOL)


def test_settings_and_files_that_do_not_fit(folder: Path, enc: EncoderModel, tmp_path: Path) -> None:
    session = ORT_CPU.load(enc.path, "CPU", OPTS)
    # No tokenizer in the folder: token ids only, as before.
    plain = build_pipeline("embedding", {}, tmp_path, session)
    assert [s.name for s in plain.inputs()] == ["input_ids", "attention_mask"]
    assert plain.optional_inputs() == []
    assert build_pipeline("embedding", {}, None, session).inputs() == plain.inputs()
    with pytest.raises(ValueError, match=r"tokenizer_file 'vocab\.json' is not in the model's folder"):
        build_pipeline("embedding", {"tokenizer_file": "vocab.json"}, folder, session)
    with pytest.raises(ValueError, match="must be a plain file name inside the model's folder"):
        build_pipeline("embedding", {"tokenizer_file": "../tokenizer.json"}, folder, session)
    (tmp_path / "broken.json").write_text(json.dumps({"model": "nothing"}))
    with pytest.raises(ValueError, match=r"cannot load the tokenizer broken\.json"):
        build_pipeline("embedding", {"tokenizer_file": "broken.json"}, tmp_path, session)
    with pytest.raises(ValueError, match="max_length 2 leaves no room for text beside the "
                                         "tokenizer's 2 special tokens"):
        build_pipeline("embedding", {"max_length": 2}, folder, session)
    with pytest.raises(ValueError, match="no input 'ids'"):
        build_pipeline("embedding", {"ids_input": "ids"}, folder, session)
    with pytest.raises(ValueError, match=r"embedding settings: key 'max_length': "
                                         r"expected an integer >= 1 or null, got 0"):
        build_pipeline("embedding", {"max_length": 0}, folder, session)


class _OddSession:
    """A model with an input the tokenizer cannot fill."""

    runtime, device = "fake", "CPU"
    inputs = [TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("position_ids", "INT64", (-1, -1))]
    outputs = [TensorSpec("last_hidden_state", "FP32", (-1, -1, 4))]

    def infer(self, inputs: Any, outputs: Any = None) -> dict[str, np.ndarray]:
        raise AssertionError("not called")

    def close(self) -> None:
        pass


def test_a_model_input_text_cannot_fill_is_refused(folder: Path) -> None:
    session: Session = _OddSession()
    with pytest.raises(ValueError, match=r"cannot feed model input\(s\) position_ids from text"):
        build_pipeline("embedding", {}, folder, session)
    # Without a tokenizer the same model still serves token ids.
    assert len(build_pipeline("embedding", {}, None, session).inputs()) == 2
