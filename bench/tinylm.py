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
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from tokenizers import Tokenizer

OPSET = 17
IR_VERSION = 8

EOS = "<|endoftext|>"
LN_EPS = 1e-5

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
class TinyLmConfig:
    vocab_size: int = 384  # byte-level BPE: 256 bytes + EOS + merges
    layers: int = 2
    heads: int = 4
    dim: int = 64
    context: int = 128  # max_position_embeddings
    steps: int = 300
    batch: int = 8
    lr: float = 3e-3
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class TinyLm:
    model_dir: Path  # holds model.onnx, tokenizer.json, config.json, weights.npz
    path: Path  # model.onnx
    weights: dict[str, np.ndarray]
    config: TinyLmConfig
    eos_token_id: int
    final_loss: float


# --- tokenizer ----------------------------------------------------------------------------


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme) trained on CORPUS, with EOS as its one special token."""
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
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    return tok


# --- model (numpy) ------------------------------------------------------------------------


def init_weights(cfg: TinyLmConfig, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    d = cfg.dim

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {"tok": normal(vocab, d), "pos": normal(cfg.context, d)}
    proj_std = 0.02 / np.sqrt(2 * cfg.layers)
    for i in range(cfg.layers):
        p = f"l{i}."
        w[p + "ln1_g"], w[p + "ln1_b"] = np.ones(d, np.float32), np.zeros(d, np.float32)
        for name in ("wq", "wk", "wv"):
            w[p + name] = normal(d, d)
        w[p + "wo"] = normal(d, d, std=proj_std)
        w[p + "ln2_g"], w[p + "ln2_b"] = np.ones(d, np.float32), np.zeros(d, np.float32)
        w[p + "w1"], w[p + "b1"] = normal(d, 4 * d), np.zeros(4 * d, np.float32)
        w[p + "w2"], w[p + "b2"] = normal(4 * d, d, std=proj_std), np.zeros(d, np.float32)
    w["lnf_g"], w["lnf_b"] = np.ones(d, np.float32), np.zeros(d, np.float32)
    w["head"] = normal(d, vocab)
    return w


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + LN_EPS)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def _ln_back(dy: np.ndarray, cache: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xhat, rstd, g = cache
    dxhat = dy * g
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    axes = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(axes), dy.sum(axes)


def loss_and_grads(
    w: dict[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, cfg: TinyLmConfig
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean next-token cross-entropy over [B, T] and its gradient, by hand."""
    bsz, t = ids.shape
    h_, hd = cfg.heads, cfg.head_dim
    scale = np.float32(1.0 / np.sqrt(hd))
    causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    x = w["tok"][ids] + w["pos"][:t]
    caches = []
    for i in range(cfg.layers):
        p = f"l{i}."
        h, c1 = _ln(x, w[p + "ln1_g"], w[p + "ln1_b"])

        def heads(m: np.ndarray) -> np.ndarray:
            return m.reshape(bsz, t, h_, hd).transpose(0, 2, 1, 3)

        q, k, v = heads(h @ w[p + "wq"]), heads(h @ w[p + "wk"]), heads(h @ w[p + "wv"])
        s = q @ k.transpose(0, 1, 3, 2) * scale + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        att = s / s.sum(-1, keepdims=True)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(bsz, t, -1)
        x = x + o @ w[p + "wo"]
        h2, c2 = _ln(x, w[p + "ln2_g"], w[p + "ln2_b"])
        u = h2 @ w[p + "w1"] + w[p + "b1"]
        r = np.maximum(u, 0)
        x = x + r @ w[p + "w2"] + w[p + "b2"]
        caches.append((h, c1, q, k, v, att, o, h2, c2, u, r))
    hf, cf = _ln(x, w["lnf_g"], w["lnf_b"])
    logits = hf @ w["head"]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    n = bsz * t
    loss = float(-np.take_along_axis(logp, targets[..., None], -1).mean())

    g: dict[str, np.ndarray] = {}
    dlogits = np.exp(logp)
    np.put_along_axis(
        dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - 1, -1
    )
    dlogits /= n
    g["head"] = hf.reshape(n, -1).T @ dlogits.reshape(n, -1)
    dx, g["lnf_g"], g["lnf_b"] = _ln_back(dlogits @ w["head"].T, cf)
    for i in reversed(range(cfg.layers)):
        p = f"l{i}."
        h, c1, q, k, v, att, o, h2, c2, u, r = caches[i]
        # MLP
        g[p + "w2"] = r.reshape(n, -1).T @ dx.reshape(n, -1)
        g[p + "b2"] = dx.sum((0, 1))
        du = (dx @ w[p + "w2"].T) * (u > 0)
        g[p + "w1"] = h2.reshape(n, -1).T @ du.reshape(n, -1)
        g[p + "b1"] = du.sum((0, 1))
        dh2, g[p + "ln2_g"], g[p + "ln2_b"] = _ln_back(du @ w[p + "w1"].T, c2)
        dx = dx + dh2
        # attention
        g[p + "wo"] = o.reshape(n, -1).T @ dx.reshape(n, -1)
        do = (dx @ w[p + "wo"].T).reshape(bsz, t, h_, hd).transpose(0, 2, 1, 3)
        datt = do @ v.transpose(0, 1, 3, 2)
        dv = att.transpose(0, 1, 3, 2) @ do
        ds = att * (datt - (datt * att).sum(-1, keepdims=True)) * scale
        dq = ds @ k
        dk = ds.transpose(0, 1, 3, 2) @ q

        def merge(m: np.ndarray) -> np.ndarray:
            return m.transpose(0, 2, 1, 3).reshape(n, -1)

        hn = h.reshape(n, -1)
        dqm, dkm, dvm = merge(dq), merge(dk), merge(dv)
        g[p + "wq"], g[p + "wk"], g[p + "wv"] = hn.T @ dqm, hn.T @ dkm, hn.T @ dvm
        dh = (dqm @ w[p + "wq"].T + dkm @ w[p + "wk"].T + dvm @ w[p + "wv"].T).reshape(bsz, t, -1)
        dh1, g[p + "ln1_g"], g[p + "ln1_b"] = _ln_back(dh, c1)
        dx = dx + dh1
    g["pos"] = np.zeros_like(w["pos"])
    g["pos"][:t] = dx.sum(0)
    g["tok"] = np.zeros_like(w["tok"])
    np.add.at(g["tok"], ids.reshape(-1), dx.reshape(n, -1))
    return loss, {key: val.astype(np.float32, copy=False) for key, val in g.items()}


def train(cfg: TinyLmConfig, stream: np.ndarray, vocab: int, eos: int) -> tuple[dict[str, np.ndarray], float]:
    """Adam (warm-up, then cosine decay) on random windows of the token stream.

    BLAS runs on one thread: these matrices are too small to share, a busy machine makes
    threaded OpenBLAS spin (ten times slower), and one thread sums in one order every run.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it BLAS keeps its own threads
        return _train(cfg, stream, vocab, eos)
    with threadpool_limits(limits=1, user_api="blas"):
        return _train(cfg, stream, vocab, eos)


def _train(
    cfg: TinyLmConfig, stream: np.ndarray, vocab: int, eos: int
) -> tuple[dict[str, np.ndarray], float]:
    w = init_weights(cfg, vocab)
    rng = np.random.default_rng(cfg.seed + 1)
    m = {k: np.zeros_like(v) for k, v in w.items()}
    s = {k: np.zeros_like(v) for k, v in w.items()}
    b1, b2, eps = 0.9, 0.99, 1e-8
    t = min(cfg.context, len(stream) - 1)
    # Half the windows start at a paragraph's first token, where a prompt starts (position
    # 0), half anywhere. The stream wraps around so that every start has a whole window.
    firsts = np.concatenate([[0], np.flatnonzero(stream == eos)[:-1] + 1])
    ring = np.concatenate([stream, stream[: t + 1]])
    loss = float("nan")
    for step in range(1, cfg.steps + 1):
        anywhere = rng.integers(0, len(stream), cfg.batch)
        starts = np.where(rng.random(cfg.batch) < 0.5, rng.choice(firsts, cfg.batch), anywhere)
        window = np.stack([ring[a : a + t + 1] for a in starts])
        loss, grads = loss_and_grads(w, window[:, :-1], window[:, 1:], cfg)
        warm = min(1.0, step / 20)
        lr = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / cfg.steps)))
        for key, grad in grads.items():
            m[key] = b1 * m[key] + (1 - b1) * grad
            s[key] = b2 * s[key] + (1 - b2) * grad * grad
            mh = m[key] / (1 - b1**step)
            sh = s[key] / (1 - b2**step)
            w[key] = (w[key] - lr * mh / (np.sqrt(sh) + eps)).astype(np.float32)
    return w, loss


# --- ONNX export --------------------------------------------------------------------------


def export_onnx(w: dict[str, np.ndarray], cfg: TinyLmConfig, path: Path) -> Path:
    """The KV-cached graph; every step computes positions and the causal mask from the cache length."""
    h_, hd, d = cfg.heads, cfg.head_dim, cfg.dim
    inits = [numpy_helper.from_array(v, k) for k, v in sorted(w.items())]

    def const(name: str, value: np.ndarray) -> None:
        inits.append(numpy_helper.from_array(value, name))

    const("c_heads", np.array([0, 0, h_, hd], np.int64))
    const("c_merge", np.array([0, 0, d], np.int64))
    const("c_zero", np.array(0, np.int64))
    const("c_one", np.array(1, np.int64))
    const("c_ax0", np.array([0], np.int64))
    const("c_ax1", np.array([1], np.int64))
    const("c_scale", np.array(1.0 / np.sqrt(hd), np.float32))
    const("c_neg", np.array(-1e9, np.float32))
    const("c_fzero", np.array(0.0, np.float32))
    nodes = [
        helper.make_node("Shape", ["past_key_0"], ["past_len1"], start=2, end=3),
        helper.make_node("Shape", ["input_ids"], ["new_len1"], start=1, end=2),
        helper.make_node("Add", ["past_len1", "new_len1"], ["total1"]),
        helper.make_node("Squeeze", ["past_len1", "c_ax0"], ["past_len"]),
        helper.make_node("Squeeze", ["total1", "c_ax0"], ["total"]),
        helper.make_node("Range", ["past_len", "total", "c_one"], ["qpos"]),  # [T]
        helper.make_node("Range", ["c_zero", "total", "c_one"], ["kpos"]),  # [P+T]
        helper.make_node("Unsqueeze", ["qpos", "c_ax1"], ["qpos_col"]),  # [T, 1]
        helper.make_node("Unsqueeze", ["kpos", "c_ax0"], ["kpos_row"]),  # [1, P+T]
        helper.make_node("Greater", ["kpos_row", "qpos_col"], ["future"]),
        helper.make_node("Where", ["future", "c_neg", "c_fzero"], ["mask"]),  # [T, P+T]
        helper.make_node("Gather", ["tok", "input_ids"], ["tok_emb"], axis=0),
        helper.make_node("Gather", ["pos", "qpos"], ["pos_emb"], axis=0),
        helper.make_node("Add", ["tok_emb", "pos_emb"], ["x0"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", "vocab"])]
    x = "x0"
    for i in range(cfg.layers):
        p = f"l{i}."

        def n(name: str, p: str = p) -> str:
            return p + name

        past_k, past_v, pres_k, pres_v = (
            f"past_key_{i}",
            f"past_value_{i}",
            f"present_key_{i}",
            f"present_value_{i}",
        )
        for name in (past_k, past_v):
            inputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", h_, "past_sequence", hd])
            )
        for name in (pres_k, pres_v):
            outputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", h_, "total_sequence", hd])
            )
        nodes += [
            helper.make_node(
                "LayerNormalization", [x, n("ln1_g"), n("ln1_b")], [n("h")], axis=-1, epsilon=LN_EPS
            ),
        ]
        for proj in ("q", "k", "v"):
            nodes += [
                helper.make_node("MatMul", [n("h"), n("w" + proj)], [n(proj + "_flat")]),
                helper.make_node("Reshape", [n(proj + "_flat"), "c_heads"], [n(proj + "_4d")]),
                helper.make_node("Transpose", [n(proj + "_4d")], [n(proj + "_new")], perm=[0, 2, 1, 3]),
            ]
        nodes += [
            helper.make_node("Concat", [past_k, n("k_new")], [pres_k], axis=2),
            helper.make_node("Concat", [past_v, n("v_new")], [pres_v], axis=2),
            helper.make_node("Transpose", [pres_k], [n("kT")], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [n("q_new"), n("kT")], [n("s0")]),
            helper.make_node("Mul", [n("s0"), "c_scale"], [n("s1")]),
            helper.make_node("Add", [n("s1"), "mask"], [n("s2")]),
            helper.make_node("Softmax", [n("s2")], [n("att")], axis=-1),
            helper.make_node("MatMul", [n("att"), pres_v], [n("o4")]),
            helper.make_node("Transpose", [n("o4")], [n("o_t")], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [n("o_t"), "c_merge"], [n("o")]),
            helper.make_node("MatMul", [n("o"), n("wo")], [n("a")]),
            helper.make_node("Add", [x, n("a")], [n("x1")]),
            helper.make_node(
                "LayerNormalization", [n("x1"), n("ln2_g"), n("ln2_b")], [n("h2")], axis=-1, epsilon=LN_EPS
            ),
            helper.make_node("MatMul", [n("h2"), n("w1")], [n("u0")]),
            helper.make_node("Add", [n("u0"), n("b1")], [n("u")]),
            helper.make_node("Relu", [n("u")], [n("r")]),
            helper.make_node("MatMul", [n("r"), n("w2")], [n("m0")]),
            helper.make_node("Add", [n("m0"), n("b2")], [n("m")]),
            helper.make_node("Add", [n("x1"), n("m")], [n("x2")]),
        ]
        x = n("x2")
    nodes += [
        helper.make_node("LayerNormalization", [x, "lnf_g", "lnf_b"], ["hf"], axis=-1, epsilon=LN_EPS),
        helper.make_node("MatMul", ["hf", "head"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "tiny_lm", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


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
