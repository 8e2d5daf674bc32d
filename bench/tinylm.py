"""A tiny decoder-only language model for the text-generation pipeline, made from nothing.

`build_tiny_lm(out_dir)` trains a byte-level BPE tokenizer (the `tokenizers` library) and a
two-layer GPT-style transformer (numpy, hand-written backward pass, Adam) on a few
public-domain paragraphs written out below, and exports it with onnx.helper the way
Hugging Face decoder exports look:

    inputs   input_ids INT64 [batch, sequence]
             past_key_<i>, past_value_<i> FP32 [batch, heads, past_sequence, head_dim]
    outputs  logits FP32 [batch, sequence, vocab]
             present_key_<i>, present_value_<i> FP32 [batch, heads, past_sequence + sequence, head_dim]

Positions are counted from the cache's length, inside the graph, so a step feeds only the
new tokens and the previous step's `present_*`. The folder gets `model.onnx`,
`tokenizer.json`, `config.json` (`max_position_embeddings`, `eos_token_id`) and
`weights.npz` (the trained weights, for tests that recompute the model in numpy).

The model memorises its text: prompted with the start of a paragraph it goes on with that
paragraph, and ends it with the end-of-text token. Deterministic: the same seed and steps
give the same bytes on one machine (float32 BLAS sums may differ across CPUs). About 10 s
on two cores.

    python -m bench.tinylm [--out DIR] [--max-tokens N]   # train, then generate on both runtimes

Here: the corpus, the tokenizer, the builder with its cache, and that command. The numpy
model and its training are in `bench.tinylm_training`, the ONNX export in `bench.tinylm_onnx`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.tinylm_onnx import export_onnx
from bench.tinylm_training import TinyLmConfig, train

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# TinyLmConfig is defined beside the training it configures; callers import it from here.
__all__ = ["CORPUS", "EOS", "TinyLm", "TinyLmConfig", "build_tiny_lm", "main", "train_tokenizer"]

EOS = "<|endoftext|>"

# Public-domain texts (Lincoln 1863, Dickens 1859, Austen 1813, Carroll 1865, Melville 1851).
CORPUS = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal.",
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that "
    "war. We have come to dedicate a portion of that field, as a final resting place for those "
    "who here gave their lives that that nation might live.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was "
    "the season of Light, it was the season of Darkness, it was the spring of hope, it was the "
    "winter of despair.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
    "nothing to do: once or twice she had peeped into the book her sister was reading, but it "
    "had no pictures or conversations in it, and what is the use of a book, thought Alice, "
    "without pictures or conversations?",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about "
    "a little and see the watery part of the world.",
)



@dataclass(frozen=True)
class TinyLm:
    model_dir: Path  # holds model.onnx, tokenizer.json, config.json, weights.npz
    path: Path  # model.onnx
    weights: dict[str, np.ndarray]
    config: TinyLmConfig
    eos_token_id: int
    final_loss: float


# --- tokenizer ----------------------------------------------------------------------------


def train_tokenizer(vocab_size: int, texts: Sequence[str] = CORPUS) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme) trained on `texts`, with EOS as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


# --- the builder --------------------------------------------------------------------------


def build_tiny_lm(out_dir: Path, cfg: TinyLmConfig | None = None) -> TinyLm:
    """Train (or reuse, when out_dir already holds this config's model) and export the tiny LM."""
    cfg = cfg or TinyLmConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    path, wfile = out_dir / "model.onnx", out_dir / "weights.npz"
    cfg_file, tok_file = out_dir / "config.json", out_dir / "tokenizer.json"
    wanted = {"edgeinfer_tiny_lm": cfg.__dict__}
    if path.exists() and wfile.exists() and cfg_file.exists() and tok_file.exists():
        meta = json.loads(cfg_file.read_text())
        if meta.get("edgeinfer_tiny_lm") == cfg.__dict__:
            with np.load(wfile) as data:
                weights = {k: data[k] for k in data.files}
            return TinyLm(out_dir, path, weights, cfg, int(meta["eos_token_id"]), float(meta["final_loss"]))

    tok = train_tokenizer(cfg.vocab_size)
    eos = tok.token_to_id(EOS)
    if eos is None:  # the trainer always adds its special tokens
        raise RuntimeError(f"the tokenizer has no {EOS} token")
    vocab = tok.get_vocab_size()
    stream = np.array(
        [t for para in CORPUS for t in [*tok.encode(para).ids, eos]],
        np.int64,
    )
    weights, loss = train(cfg, stream, vocab, eos)
    tok.save(str(tok_file))
    arrays: dict[str, Any] = weights
    np.savez(wfile, **arrays)
    export_onnx(weights, cfg, path)
    meta = {
        "model_type": "edgeinfer-tiny-lm",
        "vocab_size": vocab,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context,
        "eos_token_id": eos,
        "final_loss": loss,
        **wanted,
    }
    cfg_file.write_text(json.dumps(meta, indent=2) + "\n")  # written last: the cache's mark
    return TinyLm(out_dir, path, weights, cfg, eos, loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="model folder (default: a temporary one)")
    parser.add_argument("--max-tokens", type=int, default=60)
    args = parser.parse_args()

    from edgeinfer.runtimes.base import LoadOptions
    from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
    from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
    from edgeinfer.runtimes.pipelines import build_pipeline
    from edgeinfer.runtimes.pipelines.textgen import TextGeneration

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        lm = build_tiny_lm(out)
        print(f"trained and exported in {time.perf_counter() - t0:.1f} s (final loss {lm.final_loss:.3f})")
        prompts = ["Four score and", "It was the best of times", "Call me"]
        for backend in (ORT_CPU, OPENVINO):
            session = backend.load(lm.path, "CPU", LoadOptions(threads=1))
            pipe = build_pipeline("text-generation", {}, lm.model_dir, session)
            assert isinstance(pipe, TextGeneration)
            for prompt in prompts:
                inputs = {
                    "text_input": np.array([prompt.encode()], dtype=object),
                    "max_tokens": np.array([args.max_tokens], np.int32),
                }
                t0 = time.perf_counter()
                pieces, n = [], 0
                for chunk in pipe.run_stream(session, inputs):
                    pieces.append(bytes(chunk["text_output"][0]).decode())
                    n += len(chunk["token_ids"])
                    reason = bytes(chunk["finish_reason"][0]).decode()
                dt = time.perf_counter() - t0
                print(f"[{backend.name}] {n} tokens in {dt * 1000:.0f} ms ({n / dt:.0f} tokens/s, {reason})")
                print(f"  {prompt}|{''.join(pieces)}")
            session.close()


if __name__ == "__main__":
    main()
