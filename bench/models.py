"""Reference models shared by the tests, the demo and the benchmarks. Nothing is downloaded:
models are built by code here, or shipped inside an installed wheel (silero-vad)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset 17 / IR 8: read by every ONNX Runtime since 1.13 and every OpenVINO since 2023.
OPSET = 17
IR_VERSION = 8

_SEED = 0


@dataclass(frozen=True)
class DigitsModel:
    path: Path
    x_test: np.ndarray  # float32 [n, 64], pixel values 0..16 as load_digits gives them
    y_test: np.ndarray  # int64 [n]
    sklearn_pred: np.ndarray  # int64 [n]: scikit-learn's own predict() on x_test


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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=_SEED
    )
    # Converges in ~160 epochs (~0.3 s); 300 leaves headroom without a ConvergenceWarning.
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=_SEED)
    clf.fit(x_train, y_train)
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


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else shape[0]
    w: np.ndarray = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return w


def build_mlp(out_dir: Path, name: str = "mlp.onnx") -> Path:
    """Pure-float MLP: x FP32 [N, 64] -> MatMul+Add+Relu+MatMul+Add+Softmax -> y FP32 [N, 10]."""
    rng = np.random.default_rng(_SEED)
    inits = [
        numpy_helper.from_array(_weights(rng, 64, 32), "w1"),
        numpy_helper.from_array((rng.standard_normal(32) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array(_weights(rng, 32, 10), "w2"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z1"]),
        helper.make_node("Softmax", ["z1"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    return _save(model, out_dir / name)


def build_cnn(out_dir: Path, name: str = "cnn.onnx", size: int = 32) -> Path:
    """Small conv net: image FP32 [N, 3, size, size] -> Conv+Relu+MaxPool+Conv+Relu+
    GlobalAveragePool+Flatten+Gemm -> logits FP32 [N, 10]."""
    if size < 4 or size % 2:
        raise ValueError(f"size must be an even number >= 4, got {size}")
    rng = np.random.default_rng(_SEED + 1)
    inits = [
        numpy_helper.from_array(_weights(rng, 8, 3, 3, 3), "c1_w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "c1_b"),
        numpy_helper.from_array(_weights(rng, 16, 8, 3, 3), "c2_w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "c2_b"),
        numpy_helper.from_array(_weights(rng, 10, 16), "fc_w"),  # Gemm with transB=1
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
    return _save(model, out_dir / name)


def silero_vad_path() -> Path:
    """silero_vad.onnx from the installed silero-vad wheel.

    Found through the import system's spec, without importing the package (its __init__
    imports torch, which an edge gateway does not have). Its `If` node on the sample rate
    is what OpenVINO fails to convert.
    """
    spec = importlib.util.find_spec("silero_vad")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "data" / "silero_vad.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "silero_vad.onnx not found: the silero-vad wheel is not installed "
        "(pip install --no-deps silero-vad)"
        if spec is None
        else f"silero-vad is installed at {locations} but ships no data/silero_vad.onnx"
    )
