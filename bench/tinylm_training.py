"""The tiny language model in numpy: its configuration, its weights, the forward and
hand-written backward pass (layer norm, causal multi-head attention, ReLU MLP) and the Adam
loop that trains it. `bench.tinylm` builds the model with it; `bench.tinylm_onnx` exports
the weights it trains."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

LN_EPS = 1e-5


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


def forward(
    w: dict[str, np.ndarray], x: np.ndarray, cfg: TinyLmConfig
) -> tuple[np.ndarray, tuple[object, ...]]:
    """The transformer blocks and head on input embeddings x [B, T, dim] (tokens plus
    positions, or any prefix a caller puts first): logits [B, T, vocab] and what `backward`
    needs."""
    bsz, t, _ = x.shape
    h_, hd = cfg.heads, cfg.head_dim
    scale = np.float32(1.0 / np.sqrt(hd))
    causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)
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
    return hf @ w["head"], (caches, hf, cf)


def cross_entropy(
    logits: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """Next-token cross-entropy over [B, T] and its gradient on the logits: the mean over
    every position, or over `weights` (1 where a position counts, 0 where not)."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, targets[..., None], np.exp(picked) - 1, -1)
    if weights is None:
        dlogits /= targets.size
        return float(-picked.mean()), dlogits
    wsum = float(weights.sum())
    dlogits *= (weights / wsum).astype(np.float32)[..., None]
    return float(-(picked[..., 0] * weights).sum() / wsum), dlogits


def backward(
    w: dict[str, np.ndarray], dlogits: np.ndarray, cache: tuple[object, ...], cfg: TinyLmConfig
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The gradients of the blocks, final norm and head, and the gradient on `forward`'s x."""
    caches, hf, cf = cache
    assert isinstance(caches, list) and isinstance(hf, np.ndarray) and isinstance(cf, tuple)
    bsz, t, _ = dlogits.shape
    h_, hd = cfg.heads, cfg.head_dim
    scale = np.float32(1.0 / np.sqrt(hd))
    n = bsz * t
    g: dict[str, np.ndarray] = {}
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
    return g, dx


def loss_and_grads(
    w: dict[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, cfg: TinyLmConfig
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean next-token cross-entropy over [B, T] and its gradient, by hand."""
    t = ids.shape[1]
    logits, cache = forward(w, w["tok"][ids] + w["pos"][:t], cfg)
    loss, dlogits = cross_entropy(logits, targets)
    g, dx = backward(w, dlogits, cache, cfg)
    g["pos"] = np.zeros_like(w["pos"])
    g["pos"][:t] = dx.sum(0)
    g["tok"] = np.zeros_like(w["tok"])
    np.add.at(g["tok"], ids.reshape(-1), dx.reshape(ids.size, -1))
    return loss, {key: val.astype(np.float32, copy=False) for key, val in g.items()}


def adam_step(
    w: dict[str, np.ndarray], grads: dict[str, np.ndarray], state: tuple[dict[str, np.ndarray], ...],
    step: int, steps: int, peak_lr: float,
) -> None:
    """One Adam update in place, at the learning rate of `step` of `steps`: 20 steps of
    warm-up, then a cosine decay to a tenth of `peak_lr`. `state` is (m, s), zeros at first."""
    m, s = state
    b1, b2, eps = 0.9, 0.99, 1e-8
    warm = min(1.0, step / 20)
    lr = peak_lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
    for key, grad in grads.items():
        m[key] = b1 * m[key] + (1 - b1) * grad
        s[key] = b2 * s[key] + (1 - b2) * grad * grad
        mh = m[key] / (1 - b1**step)
        sh = s[key] / (1 - b2**step)
        w[key] = (w[key] - lr * mh / (np.sqrt(sh) + eps)).astype(np.float32)


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """BLAS on one thread while training: these matrices are too small to share, a busy
    machine makes threaded OpenBLAS spin (ten times slower), and one thread sums in one
    order every run."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it BLAS keeps its own threads
        return contextlib.nullcontext()
    limits: contextlib.AbstractContextManager[object] = threadpool_limits(limits=1, user_api="blas")
    return limits


def train(cfg: TinyLmConfig, stream: np.ndarray, vocab: int, eos: int) -> tuple[dict[str, np.ndarray], float]:
    """Adam on random windows of the token stream, BLAS on one thread (`one_blas_thread`)."""
    with one_blas_thread():
        return _train(cfg, stream, vocab, eos)


def _train(
    cfg: TinyLmConfig, stream: np.ndarray, vocab: int, eos: int
) -> tuple[dict[str, np.ndarray], float]:
    w = init_weights(cfg, vocab)
    rng = np.random.default_rng(cfg.seed + 1)
    state = ({k: np.zeros_like(v) for k, v in w.items()}, {k: np.zeros_like(v) for k, v in w.items()})
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
        adam_step(w, grads, state, step, cfg.steps, cfg.lr)
    return w, loss
