"""A tiny vision-language model for the image-to-text pipeline, made from nothing.

`build_tiny_vlm(out_dir)` trains a byte-level BPE tokenizer on the captions below, and an
image encoder feeding the tiny LM's decoder (`bench.tinyvlm_training`: numpy, hand-written
backward, Adam) end to end on scikit-learn's 8x8 digits, then exports the two as ONNX
models of one image-to-text version:

    encoder.onnx  pixel_values FP32 [batch, 1, 8, 8] (grey, 0..1)
                  -> image_embeds FP32 [batch, image_tokens, dim]
    decoder.onnx  input_ids INT64 [batch, sequence], image_embeds FP32 [batch, prefix, dim],
                  past_key_<i>, past_value_<i> -> logits, present_key_<i>, present_value_<i>
                  (the tiny LM's KV-cached graph, `bench.tinylm`, with the image embeddings
                  put before the tokens: the image's on the first step, none after)

The folder also gets `tokenizer.json`, `config.json` (`max_position_embeddings`,
`eos_token_id`, `image_tokens`) and `weights.npz` plus `holdout.npz` (the images kept out
of training, with their digits) for tests that recompute the model in numpy.

Prompted "What digit is this?" it answers the digit's name ("seven"); prompted "Describe
the image." it answers "a handwritten 7". About 5-10 s on two cores; deterministic on one
machine like the tiny LM.

    python -m bench.tinyvlm [--out DIR]   # train, then caption held-out digits on both runtimes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bench.onnx_common import IR_VERSION, OPSET, save_checked
from bench.tinylm import EOS, train_tokenizer
from bench.tinylm_onnx import export_onnx
from bench.tinyvlm_training import PIXELS, TinyVlmConfig, greedy, train

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["EOS", "PROMPTS", "TinyVlm", "TinyVlmConfig", "build_tiny_vlm", "caption", "main"]

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# prompt -> caption of digit d
PROMPTS: dict[str, Any] = {
    "What digit is this?": lambda d: NAMES[d],
    "Describe the image.": lambda d: f"a handwritten {d}",
}
HOLDOUT = 360  # the last images of the shuffled set: never trained on
EMBEDS = "image_embeds"


def caption(prompt: str, digit: int) -> str:
    """The caption the model is trained to give for `digit` prompted with `prompt`."""
    text: str = PROMPTS[prompt](digit)
    return text


@dataclass(frozen=True)
class TinyVlm:
    model_dir: Path  # encoder.onnx, decoder.onnx, tokenizer.json, config.json, weights.npz, holdout.npz
    weights: dict[str, np.ndarray]
    config: TinyVlmConfig
    eos_token_id: int
    final_loss: float
    holdout_pixels: np.ndarray  # FP32 [n, 64], 0..1
    holdout_digits: np.ndarray  # INT64 [n]

    @property
    def encoder(self) -> Path:
        return self.model_dir / "encoder.onnx"

    @property
    def decoder(self) -> Path:
        return self.model_dir / "decoder.onnx"

    def tokenizer(self) -> Tokenizer:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))

    def greedy(self, pixels: np.ndarray, prompt: str, max_tokens: int = 16) -> list[int]:
        """The numpy model's greedy tokens for one image (pixels [64] or [8, 8], 0..1)."""
        ids = self.tokenizer().encode(prompt, add_special_tokens=False).ids
        return greedy(self.weights, pixels.reshape(PIXELS), ids, max_tokens, self.eos_token_id, self.config)


def export_encoder(w: dict[str, np.ndarray], cfg: TinyVlmConfig, path: Path) -> Path:
    """pixel_values [batch, 1, 8, 8] -> image_embeds [batch, image_tokens, dim], as `encode`."""
    inits = [numpy_helper.from_array(w[k], k) for k in ("enc_w1", "enc_b1", "enc_w2", "enc_b2")]
    inits += [numpy_helper.from_array(np.array([-1, PIXELS], np.int64), "c_flat"),
              numpy_helper.from_array(np.array([-1, cfg.image_tokens, cfg.lm.dim], np.int64), "c_tokens")]
    nodes = [
        helper.make_node("Reshape", ["pixel_values", "c_flat"], ["flat"]),
        helper.make_node("MatMul", ["flat", "enc_w1"], ["u0"]),
        helper.make_node("Add", ["u0", "enc_b1"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("MatMul", ["r", "enc_w2"], ["e0"]),
        helper.make_node("Add", ["e0", "enc_b2"], ["e"]),
        helper.make_node("Reshape", ["e", "c_tokens"], [EMBEDS]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_vlm_encoder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(EMBEDS, TensorProto.FLOAT, ["batch", cfg.image_tokens, cfg.lm.dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return save_checked(model, path)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def _cached(out_dir: Path, cfg: TinyVlmConfig) -> TinyVlm | None:
    cfg_file = out_dir / "config.json"
    files = ("encoder.onnx", "decoder.onnx", "tokenizer.json", "weights.npz", "holdout.npz")
    if not cfg_file.exists() or not all((out_dir / f).exists() for f in files):
        return None
    meta = json.loads(cfg_file.read_text())
    if meta.get("edgeinfer_tiny_vlm") != json.loads(json.dumps(asdict(cfg))):
        return None
    with np.load(out_dir / "weights.npz") as data:
        weights = {k: data[k] for k in data.files}
    with np.load(out_dir / "holdout.npz") as data:
        px, dg = data["pixels"], data["digits"]
    return TinyVlm(out_dir, weights, cfg, int(meta["eos_token_id"]), float(meta["final_loss"]), px, dg)


def build_tiny_vlm(out_dir: Path, cfg: TinyVlmConfig | None = None) -> TinyVlm:
    """Train (or reuse, when out_dir already holds this config's model) and export the tiny VLM."""
    cfg = cfg or TinyVlmConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = _cached(out_dir, cfg)
    if cached is not None:
        return cached
    tok = train_tokenizer(cfg.lm.vocab_size, [*PROMPTS, *(caption(p, d) for p in PROMPTS for d in range(10))])
    eos = tok.token_to_id(EOS)
    if eos is None:  # the trainer always adds its special tokens
        raise RuntimeError(f"the tokenizer has no {EOS} token")

    def ids(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False).ids)

    captions = [[(ids(p), ids(caption(p, d))) for p in PROMPTS] for d in range(10)]
    pixels, digits = _digits()
    weights, loss = train(cfg, pixels[:-HOLDOUT], captions, digits[:-HOLDOUT], tok.get_vocab_size(), eos)
    tok.save(str(out_dir / "tokenizer.json"))
    arrays: dict[str, Any] = weights
    np.savez(out_dir / "weights.npz", **arrays)
    np.savez(out_dir / "holdout.npz", pixels=pixels[-HOLDOUT:], digits=digits[-HOLDOUT:])
    export_encoder(weights, cfg, out_dir / "encoder.onnx")
    decoder_weights = {k: v for k, v in weights.items() if not k.startswith("enc_")}
    export_onnx(decoder_weights, cfg.lm, out_dir / "decoder.onnx", prefix_input=EMBEDS)
    meta = {
        "model_type": "edgeinfer-tiny-vlm",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": cfg.lm.dim,
        "num_hidden_layers": cfg.lm.layers,
        "num_attention_heads": cfg.lm.heads,
        "max_position_embeddings": cfg.lm.context,
        "image_tokens": cfg.image_tokens,
        "eos_token_id": eos,
        "final_loss": loss,
        "edgeinfer_tiny_vlm": asdict(cfg),
    }
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: the cache's mark
    return TinyVlm(out_dir, weights, cfg, eos, loss, pixels[-HOLDOUT:], digits[-HOLDOUT:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="model folder (default: a temporary one)")
    parser.add_argument("--images", type=int, default=HOLDOUT, help="held-out digits to caption")
    args = parser.parse_args()

    from edgeinfer.runtimes.base import LoadOptions
    from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
    from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        vlm = build_tiny_vlm(out)
        print(f"trained and exported in {time.perf_counter() - t0:.1f} s (final loss {vlm.final_loss:.3f})")
        tok = vlm.tokenizer()
        n = min(args.images, len(vlm.holdout_digits))
        for prompt in PROMPTS:
            right = sum(tok.decode(vlm.greedy(px, prompt)) == caption(prompt, int(d))
                        for px, d in zip(vlm.holdout_pixels[:n], vlm.holdout_digits[:n], strict=True))
            print(f"numpy, {prompt!r}: {right}/{n} held-out captions right ({100 * right / n:.1f}%)")
        for backend in (ORT_CPU, OPENVINO):
            sessions = {role: backend.load(out / f"{role}.onnx", "CPU", LoadOptions(threads=1))
                        for role in ("encoder", "decoder")}
            _caption_onnx(vlm, sessions, backend.name)
            for s in sessions.values():
                s.close()


def _caption_onnx(vlm: TinyVlm, sessions: dict[str, Any], name: str) -> None:
    import io

    from PIL import Image

    from edgeinfer.runtimes.pipelines import build_pipeline

    pipe: Any = build_pipeline("image-to-text", {}, vlm.model_dir, sessions)
    prompt = next(iter(PROMPTS))
    t0 = time.perf_counter()
    for i in range(10):
        buf = io.BytesIO()
        grey = np.rint(vlm.holdout_pixels[i].reshape(8, 8) * 255).astype(np.uint8)
        Image.fromarray(grey, "L").save(buf, "PNG")
        png = buf.getvalue()
        out = pipe.run(sessions, {"image": np.array([png], dtype=object),
                                  "text_input": np.array([prompt.encode()], dtype=object)})
        print(f"[{name}] digit {vlm.holdout_digits[i]}: {bytes(out['text_output'][0]).decode()!r}")
    print(f"[{name}] {(time.perf_counter() - t0) * 100:.1f} ms per caption")


if __name__ == "__main__":
    main()
