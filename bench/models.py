"""Reference models shared by the tests, the demo and the benchmarks. Nothing is downloaded:
models are built by code, or shipped inside an installed wheel (silero-vad, rapidocr).

This module builds the synthetic graphs (mlp, cnn, heavy, scaled, reduce_mean, nan,
mobilenet_like) and the scikit-learn digits classifier, and is the one place callers import
every reference model from: the text models (`bench.textmodels`), the wheels' models
(`bench.wheelmodels`) and the tiny language model (`bench.tinylm`) are imported back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.onnx_common import IR_VERSION, OPSET, SEED, save_checked, seeded_weights
from bench.textmodels import EncoderModel, build_encoder, build_wordpiece_tokenizer
from bench.tinylm import TinyLm, TinyLmConfig, build_tiny_lm
from bench.wheelmodels import RAPIDOCR_MODELS, rapidocr_models_dir, silero_vad_path

__all__ = [
    "IR_VERSION", "OPSET", "RAPIDOCR_MODELS", "DigitsModel", "EncoderModel", "TinyLm",
    "TinyLmConfig", "WeightyModel", "build_cnn", "build_digits", "build_digits_float",
    "build_encoder", "build_heavy", "build_mlp", "build_mobilenet_like", "build_nan",
    "build_reduce_mean", "build_scaled", "build_tiny_lm", "build_weighty",
    "build_wordpiece_tokenizer", "rapidocr_models_dir", "silero_vad_path",
]


@dataclass(frozen=True)
class DigitsModel:
    path: Path
    x_test: np.ndarray  # float32 [n, 64], pixel values 0..16 as load_digits gives them
    y_test: np.ndarray  # int64 [n]
    sklearn_pred: np.ndarray  # int64 [n]: scikit-learn's own predict() on x_test


def _train_digits() -> tuple[Any, np.ndarray, np.ndarray]:
    """The one digits classifier both exports share: (fitted MLP, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=SEED
    )
    # Converges in ~160 epochs (~0.3 s); 300 leaves headroom without a ConvergenceWarning.
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=SEED)
    clf.fit(x_train, y_train)
    return clf, x_test, y_test


def build_digits(out_dir: Path) -> DigitsModel:
    """scikit-learn MLP on the 8x8 digits, as digits.onnx (outputs 'label' INT64 and
    'probabilities' FP32 [n, 10]).

    The ONNX graph uses ai.onnx.ml.ArrayFeatureExtractor, which OpenVINO does not convert:
    the model every runtime fallback test leans on. Cached per out_dir: a digits.onnx with
    its digits.npz sidecar is reused, not retrained.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path, sidecar = out_dir / "digits.onnx", out_dir / "digits.npz"
    if path.exists() and sidecar.exists():
        with np.load(sidecar) as data:
            return DigitsModel(path, data["x_test"], data["y_test"], data["sklearn_pred"])

    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf, x_test, y_test = _train_digits()
    onx = convert_sklearn(
        clf,
        initial_types=[("x", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},  # plain tensors, not a list of dicts
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    sklearn_pred = clf.predict(x_test).astype(np.int64)
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(onx.SerializeToString())
    np.savez(sidecar, x_test=x_test, y_test=y_test, sklearn_pred=sklearn_pred)
    tmp.replace(path)  # the model appears last and whole: a cache hit never sees half a file
    return DigitsModel(path, x_test, y_test, sklearn_pred)


def _dense_softmax_model(graph_name: str, inits: list[Any], output: str) -> Any:
    """x FP32 [N, 64] -> MatMul w1 + b1 -> Relu -> MatMul w2 + b2 -> Softmax -> `output`
    FP32 [N, 10]; the weights are the initializers w1, b1, w2, b2."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z1"]),
        helper.make_node("Softmax", ["z1"], [output], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )


def build_mlp(out_dir: Path, name: str = "mlp.onnx") -> Path:
    """Pure-float MLP: x FP32 [N, 64] -> MatMul+Add+Relu+MatMul+Add+Softmax -> y FP32 [N, 10]."""
    rng = np.random.default_rng(SEED)
    inits = [
        numpy_helper.from_array(seeded_weights(rng, 64, 32), "w1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array(seeded_weights(rng, 32, 10), "w2"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "b2"),
    ]
    model = _dense_softmax_model("mlp", inits, "y")
    return save_checked(model, out_dir / name)


def build_cnn(out_dir: Path, name: str = "cnn.onnx", size: int = 32) -> Path:
    """Small conv net: image FP32 [N, 3, size, size] -> Conv+Relu+MaxPool+Conv+Relu+
    GlobalAveragePool+Flatten+Gemm -> logits FP32 [N, 10]."""
    if size < 4 or size % 2:
        raise ValueError(f"size must be an even number >= 4, got {size}")
    rng = np.random.default_rng(SEED + 1)
    inits = [
        numpy_helper.from_array(seeded_weights(rng, 8, 3, 3, 3), "c1_w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "c1_b"),
        numpy_helper.from_array(seeded_weights(rng, 16, 8, 3, 3), "c2_w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "c2_b"),
        numpy_helper.from_array(seeded_weights(rng, 10, 16), "fc_w"),  # Gemm with transB=1
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2_w", "c2_b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return save_checked(model, out_dir / name)


def build_heavy(out_dir: Path, name: str = "heavy.onnx", width: int = 1024, layers: int = 8) -> Path:
    """A model whose cost grows with the batch: x FP32 [N, 64] -> y FP32 [N, 10].

    Each row goes through `layers` dense layers of `width` (tanh keeps values finite), so a
    warm-up at batch 1 is quick while a job of a few thousand rows keeps a core busy for
    seconds: for tests of slow jobs, stalls and backpressure.
    """
    rng = np.random.default_rng(SEED)
    inits = [numpy_helper.from_array(seeded_weights(rng, 64, width), "w_in"),
             numpy_helper.from_array(seeded_weights(rng, width, width), "w"),
             numpy_helper.from_array(seeded_weights(rng, width, 10), "w_out")]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return save_checked(model, out_dir / name)


@dataclass(frozen=True)
class WeightyModel:
    """A model that is mostly weights (`build_weighty`) and the answer it must give."""

    path: Path
    w: np.ndarray  # [width, width]
    w_out: np.ndarray  # [width, 16]

    def expected(self, x: np.ndarray) -> np.ndarray:
        y: np.ndarray = np.tanh(x.astype(np.float64) @ self.w) @ self.w_out
        return y


def build_weighty(out_dir: Path, name: str, width: int, seed: int) -> WeightyModel:
    """x FP32 [1, width] -> tanh(x @ w) @ w_out -> y FP32 [1, 16]: about width**2 * 4 bytes
    of weights and next to no work, so loading it is what costs (the model cache's tests and
    bench); `seed` makes models of one width differ (their own sha256)."""
    rng = np.random.default_rng(seed)
    w = seeded_weights(rng, width, width)
    w_out = seeded_weights(rng, width, 16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "w_out"], ["y"])]
    graph = helper.make_graph(
        nodes, "weighty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(w_out, "w_out")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return WeightyModel(save_checked(model, out_dir / name), w, w_out)


def build_scaled(out_dir: Path, factor: float, name: str | None = None, busy_layers: int = 0,
                 busy_rows: int = 64) -> Path:
    """x FP32 [N, 64] -> y FP32 [N, 64] = factor * x, exactly: model versions that a result
    tells apart (v1 doubles nothing, v2 doubles, ...).

    `busy_layers` adds, per input row, a chain of 512-wide MatMul+Tanh over `busy_rows`
    copies of it whose result is multiplied by 0 and added: a knob for how long one
    inference takes that leaves y exact (the deploy tests' slow version: a latency budget).
    """
    rng = np.random.default_rng(SEED + 2)
    width = 512
    inits = [numpy_helper.from_array(np.array(factor, np.float32), "factor")]
    nodes = [helper.make_node("Mul", ["x", "factor"], ["scaled"])]
    if busy_layers:
        inits += [
            numpy_helper.from_array(np.array([busy_rows, width // 64], np.int64), "repeats"),
            numpy_helper.from_array(np.array([busy_rows, -1, width], np.int64), "stacked"),
            numpy_helper.from_array(seeded_weights(rng, width, width), "w"),
            numpy_helper.from_array(seeded_weights(rng, width, 64), "w_out"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
        nodes.append(helper.make_node("Tile", ["x", "repeats"], ["h0"]))  # [rows*N, 512]
        for i in range(busy_layers):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
        nodes += [
            helper.make_node("Reshape", [f"h{busy_layers}", "stacked"], ["r"]),  # [rows, N, 512]
            helper.make_node("ReduceMean", ["r"], ["mean"], axes=[0], keepdims=0),  # [N, 512]
            helper.make_node("MatMul", ["mean", "w_out"], ["busy"]),  # [N, 64]
            helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
            helper.make_node("Add", ["scaled", "nothing"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["scaled"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return save_checked(model, out_dir / (name or f"scaled-{factor:g}.onnx"))


def build_reduce_mean(out_dir: Path, name: str = "reduce_mean.onnx", size: int = 150_000) -> Path:
    """x FP32 [N, size] -> y FP32 [N, 1], the mean of each row: a model whose job is mostly
    its tensor (600 KB at the default size) and whose runtime cost is tiny, so the agent's own
    cost per byte of a job shows (issue 11's 600 KB tensor job)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)]
    graph = helper.make_graph(
        nodes,
        "reduce_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return save_checked(model, out_dir / name)


def build_nan(out_dir: Path, name: str = "nan.onnx") -> Path:
    """x FP32 [N, 64] -> y FP32 [N, 64] = (x - x) / (x - x): NaN for every input, a model
    that loads and runs but must never serve (the deploy health gate's test)."""
    nodes = [
        helper.make_node("Sub", ["x", "x"], ["zero"]),
        helper.make_node("Div", ["zero", "zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return save_checked(model, out_dir / name)


def build_mobilenet_like(out_dir: Path, name: str = "mobilenet_like.onnx", classes: int = 1000) -> Path:
    """A MobileNet-v1-like classifier: image FP32 [N, 3, 224, 224] -> logits FP32 [N, classes].

    A 3x3 stride-2 stem, then depthwise-separable blocks (3x3 depthwise Conv + Relu, 1x1
    pointwise Conv + Relu; batch norm folded into the conv bias, as an exported inference
    graph has it), global average pooling and a dense layer: ~3.5 M parameters and ~0.5
    GFLOP per image, the cost profile of the small vision models gateways run. Weights are
    random (seeded): for timing, not for accuracy.
    """
    rng = np.random.default_rng(SEED + 3)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(x: str, out: str, c_in: int, c_out: int, k: int, stride: int, group: int) -> str:
        w = seeded_weights(rng, c_out, c_in // group, k, k)
        inits.append(numpy_helper.from_array(w, f"{out}_w"))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{out}_b"))
        pad = k // 2
        nodes.append(helper.make_node(
            "Conv", [x, f"{out}_w", f"{out}_b"], [f"{out}_c"], kernel_shape=[k, k],
            strides=[stride, stride], pads=[pad] * 4, group=group,
        ))
        nodes.append(helper.make_node("Relu", [f"{out}_c"], [out]))
        return out

    x = conv("image", "stem", 3, 32, 3, 2, 1)
    # (output channels, stride) of each depthwise-separable block: MobileNet v1 with three
    # of its five 512-channel blocks left out (3.4 M parameters instead of 4.2 M).
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (1024, 2), (1024, 1)]
    c = 32
    for i, (c_out, stride) in enumerate(blocks):
        x = conv(x, f"b{i}_dw", c, c, 3, stride, c)
        x = conv(x, f"b{i}_pw", c, c_out, 1, 1, 1)
        c = c_out
    inits.append(numpy_helper.from_array(seeded_weights(rng, classes, c), "fc_w"))  # Gemm transB=1
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mobilenet_like",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return save_checked(model, out_dir / name)


def build_digits_float(out_dir: Path, name: str = "digits_float.onnx") -> DigitsModel:
    """The same scikit-learn MLP as `build_digits` (same split, seed and training), exported
    by hand from its `coefs_` and `intercepts_` as plain MatMul+Add+Relu+MatMul+Add+Softmax:
    x FP32 [N, 64] (pixels 0..16) -> probabilities FP32 [N, 10]. Every runtime, OpenVINO
    included, runs it. Cached per out_dir like build_digits.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    sidecar = path.with_suffix(".npz")
    if path.exists() and sidecar.exists():
        with np.load(sidecar) as data:
            return DigitsModel(path, data["x_test"], data["y_test"], data["sklearn_pred"])

    clf, x_test, y_test = _train_digits()
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [
        numpy_helper.from_array(np.asarray(w, np.float32), n)
        for w, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    ]
    model = _dense_softmax_model("digits_float", inits, "probabilities")
    sklearn_pred = clf.predict(x_test).astype(np.int64)
    np.savez(sidecar, x_test=x_test, y_test=y_test, sklearn_pred=sklearn_pred)
    save_checked(model, path)
    return DigitsModel(path, x_test, y_test, sklearn_pred)
