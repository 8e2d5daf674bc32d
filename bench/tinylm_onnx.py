"""The tiny language model's trained weights as a KV-cached ONNX graph, laid out the way
Hugging Face decoder exports are (the inputs and outputs are listed in `bench.tinylm`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.onnx_common import IR_VERSION, OPSET
from bench.tinylm_training import LN_EPS, TinyLmConfig


def export_onnx(
    w: dict[str, np.ndarray], cfg: TinyLmConfig, path: Path, prefix_input: str | None = None
) -> Path:
    """The KV-cached graph; every step computes positions and the causal mask from the cache length.

    With `prefix_input` (the image-to-text decoder, `bench.tinyvlm`) the graph takes one more
    input, FP32 [batch, prefix, dim]: embeddings put before the step's tokens (an image's, on
    the first step; [batch, 0, dim] on the next), counted in the positions and the cache.
    """
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
        # the new positions: the tokens', plus the prefix's when there is one (added below)
        helper.make_node("Shape", ["input_ids"], ["ids_len1" if prefix_input else "new_len1"],
                         start=1, end=2),
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
        helper.make_node("Add", ["in_emb" if prefix_input else "tok_emb", "pos_emb"], ["x0"]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    if prefix_input:
        nodes[2:2] = [
            helper.make_node("Shape", [prefix_input], ["prefix_len1"], start=1, end=2),
            helper.make_node("Add", ["prefix_len1", "ids_len1"], ["new_len1"]),
        ]
        nodes.insert(-1, helper.make_node("Concat", [prefix_input, "tok_emb"], ["in_emb"], axis=1))
        inputs.append(helper.make_tensor_value_info(prefix_input, TensorProto.FLOAT, ["batch", "prefix", d]))
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
