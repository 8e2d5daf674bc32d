"""Text models for the embedding pipeline, built by code: a tiny encoder (ONNX) and a
BERT-style WordPiece tokenizer.json for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench.onnx_common import IR_VERSION, OPSET, SEED, save_checked, seeded_weights


@dataclass(frozen=True)
class EncoderModel:
    path: Path
    embeddings: np.ndarray  # FP32 [vocab, dim]: the token embedding table
    weight: np.ndarray  # FP32 [dim, dim]
    mask_bias: np.ndarray  # FP32 [dim]; zeros when the model has no mask input


def build_encoder(out_dir: Path, name: str = "encoder.onnx", vocab: int = 100, dim: int = 16,
                  with_mask: bool = True) -> EncoderModel:
    """A tiny text encoder for the embedding pipeline:
    input_ids INT64 [N, T] (and attention_mask INT64 [N, T]) -> last_hidden_state FP32 [N, T, dim]
    = tanh(E[input_ids] @ W + mask[..., None] * b); without a mask input, tanh(E[ids] @ W).
    """
    rng = np.random.default_rng(SEED + 4)
    emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    weight = seeded_weights(rng, dim, dim)
    bias = (rng.standard_normal(dim) * 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(weight, "W")]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["tok"], axis=0),
        helper.make_node("MatMul", ["tok", "W"], ["proj"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"]))
        inits += [numpy_helper.from_array(bias, "b"),
                  numpy_helper.from_array(np.array([-1], np.int64), "last")]
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
            helper.make_node("Mul", ["mask3", "b"], ["shift"]),
            helper.make_node("Add", ["proj", "shift"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["last_hidden_state"]),
        ]
    else:
        nodes.append(helper.make_node("Tanh", ["proj"], ["last_hidden_state"]))
    graph = helper.make_graph(
        nodes,
        "encoder",
        inputs,
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "T", dim])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    path = save_checked(model, out_dir / name)
    return EncoderModel(path, emb, weight, bias if with_mask else np.zeros(dim, np.float32))


def build_wordpiece_tokenizer(out_dir: Path, texts: list[str] | tuple[str, ...], vocab_size: int = 200,
                              name: str = "tokenizer.json") -> Path:
    """A BERT-style WordPiece tokenizer.json for `texts` (the `tokenizers` library):
    lower-cased, [CLS] ... [SEP] added, [PAD] = 0, [UNK] = 1. The vocabulary is built here,
    not by tokenizers' trainer (whose ties fall differently from run to run): the special
    tokens, every character of the texts alone and as a `##` continuation (so any word of
    them splits into known pieces), then their most frequent words up to `vocab_size`. The
    same texts give the same file. Its vocabulary (`get_vocab_size()`) fits an encoder of
    build_encoder(vocab=...)."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in tokens:
            tokens.append(word)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))  # noqa: S106 (a token, not a password)
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tok.save(str(path))
    return path
