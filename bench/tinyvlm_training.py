"""The tiny vision-language model in numpy: an image encoder (a two-layer MLP from the 8x8
pixels to `image_tokens` embeddings) whose output is put before the prompt's token
embeddings of the tiny LM's decoder (`bench.tinylm_training`: same blocks, same hand-written
backward, same Adam), trained end to end on captions, and the greedy decoding that recomputes
the whole sequence every step (no cache): the reference the ONNX export is checked against.
`bench.tinyvlm` builds the model with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.tinylm_training import (
    TinyLmConfig,
    adam_step,
    backward,
    cross_entropy,
    forward,
    init_weights,
    one_blas_thread,
)

PIXELS = 64  # 8x8, values 0..1 (scikit-learn's digits / 16)


@dataclass(frozen=True)
class TinyVlmConfig:
    # The decoder: the tiny LM's blocks, with a context that fits image + prompt + caption.
    lm: TinyLmConfig = field(default_factory=lambda: TinyLmConfig(vocab_size=320, context=48))
    image_tokens: int = 4  # embeddings the encoder puts before the prompt
    hidden: int = 128  # the encoder's hidden layer
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0


def init_vlm_weights(cfg: TinyVlmConfig, vocab: int) -> dict[str, np.ndarray]:
    w = init_weights(cfg.lm, vocab)
    rng = np.random.default_rng(cfg.seed + 7)
    out = cfg.image_tokens * cfg.lm.dim
    w["enc_w1"] = (rng.standard_normal((PIXELS, cfg.hidden)) * np.sqrt(2 / PIXELS)).astype(np.float32)
    w["enc_b1"] = np.zeros(cfg.hidden, np.float32)
    w["enc_w2"] = (rng.standard_normal((cfg.hidden, out)) * 0.02).astype(np.float32)
    w["enc_b2"] = np.zeros(out, np.float32)
    return w


def encode(w: dict[str, np.ndarray], pixels: np.ndarray, cfg: TinyVlmConfig) -> tuple[np.ndarray, ...]:
    """pixels [B, 64] -> (image embeddings [B, image_tokens, dim], hidden pre-activation, hidden)."""
    u = pixels @ w["enc_w1"] + w["enc_b1"]
    r = np.maximum(u, 0)
    e = r @ w["enc_w2"] + w["enc_b2"]
    return e.reshape(len(pixels), cfg.image_tokens, cfg.lm.dim), u, r


def embed(w: dict[str, np.ndarray], image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The decoder's input: image embeddings, then the tokens' embeddings, plus positions."""
    x: np.ndarray = np.concatenate([image, w["tok"][ids]], axis=1)
    x += w["pos"][: x.shape[1]]
    return x


def loss_and_grads(
    w: dict[str, np.ndarray], pixels: np.ndarray, ids: np.ndarray, targets: np.ndarray,
    weights: np.ndarray, cfg: TinyVlmConfig,
) -> tuple[float, dict[str, np.ndarray]]:
    """Cross-entropy of the caption tokens (where `weights` is 1) and every weight's gradient.

    ids [B, L]: the prompt and caption tokens fed after the image; targets and weights
    [B, image_tokens + L], one per position of the decoder's input."""
    k = cfg.image_tokens
    image, u, r = encode(w, pixels, cfg)
    logits, cache = forward(w, embed(w, image, ids), cfg.lm)
    loss, dlogits = cross_entropy(logits, targets, weights)
    g, dx = backward(w, dlogits, cache, cfg.lm)
    t = dx.shape[1]
    g["pos"] = np.zeros_like(w["pos"])
    g["pos"][:t] = dx.sum(0)
    g["tok"] = np.zeros_like(w["tok"])
    np.add.at(g["tok"], ids.reshape(-1), dx[:, k:].reshape(ids.size, -1))
    de = dx[:, :k].reshape(len(pixels), -1)
    g["enc_w2"], g["enc_b2"] = r.T @ de, de.sum(0)
    du = (de @ w["enc_w2"].T) * (u > 0)
    g["enc_w1"], g["enc_b1"] = pixels.T @ du, du.sum(0)
    return loss, {key: val.astype(np.float32, copy=False) for key, val in g.items()}


def batch_of(
    pairs: Sequence[tuple[list[int], list[int]]], eos: int, image_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, targets, weights) for (prompt ids, caption ids) pairs: each row is prompt,
    caption, end token, padded with end tokens; only the caption's and its end token's
    predictions count."""
    rows = [[*p, *c, eos] for p, c in pairs]
    length = max(map(len, rows))
    seq = np.full((len(rows), length), eos, np.int64)
    weights = np.zeros((len(rows), image_tokens + length - 1), np.float32)
    for i, ((prompt, _), row) in enumerate(zip(pairs, rows, strict=True)):
        seq[i, : len(row)] = row
        # position image_tokens + j - 1 predicts token j of the row
        weights[i, image_tokens + len(prompt) - 1 : image_tokens + len(row) - 1] = 1
    targets = np.zeros(weights.shape, np.int64)
    targets[:, image_tokens - 1 :] = seq
    return seq[:, :-1], targets, weights


def train(
    cfg: TinyVlmConfig, pixels: np.ndarray, captions: list[list[tuple[list[int], list[int]]]],
    labels: np.ndarray, vocab: int, eos: int,
) -> tuple[dict[str, np.ndarray], float]:
    """Adam on random batches: an image of the training set, one of its (prompt, caption)
    pairs at random. `captions[d]` are digit d's pairs; `labels` the images' digits."""
    with one_blas_thread():
        w = init_vlm_weights(cfg, vocab)
        rng = np.random.default_rng(cfg.seed + 1)
        state = ({k: np.zeros_like(v) for k, v in w.items()}, {k: np.zeros_like(v) for k, v in w.items()})
        loss = float("nan")
        for step in range(1, cfg.steps + 1):
            pick = rng.integers(0, len(pixels), cfg.batch)
            pairs = [captions[labels[i]][rng.integers(0, len(captions[labels[i]]))] for i in pick]
            ids, targets, weights = batch_of(pairs, eos, cfg.image_tokens)
            loss, grads = loss_and_grads(w, pixels[pick], ids, targets, weights, cfg)
            adam_step(w, grads, state, step, cfg.steps, cfg.lr)
        return w, loss


def greedy(
    w: dict[str, np.ndarray], pixels: np.ndarray, prompt: list[int], max_tokens: int, eos: int,
    cfg: TinyVlmConfig,
) -> list[int]:
    """Greedy tokens for one image [64] and prompt, the whole sequence recomputed every step
    (no cache); ends after the end token (kept, as the pipeline keeps it in token_ids)."""
    image = encode(w, pixels[None].astype(np.float32), cfg)[0]
    out: list[int] = []
    for _ in range(max_tokens):
        logits = forward(w, embed(w, image, np.asarray([prompt + out], np.int64)), cfg.lm)[0]
        out.append(int(np.argmax(logits[0, -1])))
        if out[-1] == eos:
            break
    return out
