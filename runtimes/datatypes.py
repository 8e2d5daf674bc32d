"""OIP v2 (KServe) datatype strings and their numpy, ONNX Runtime and OpenVINO counterparts.

The OIP string is the lingua franca: jobs carry it, TensorSpec holds it, and each runtime's
own type names are translated to it here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeinfer.contract.datatypes import OIP_DATATYPES

# BYTES has no fixed-width numpy type: a tensor of variable-length byte strings is an
# object array of `bytes`, which is also what ONNX Runtime returns for tensor(string).
_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

assert frozenset(_TO_NUMPY) == OIP_DATATYPES  # one counterpart per contract datatype

_FROM_NUMPY: dict[np.dtype[Any], str] = {dt: name for name, dt in _TO_NUMPY.items()}

# ONNX Runtime describes tensors as 'tensor(<elem>)'.
_ONNX_ELEM: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
}

# OpenVINO element types by `ov.Type.get_type_name()`; kept as strings so this module
# does not import OpenVINO.
_OPENVINO_ELEM: dict[str, str] = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
    "string": "BYTES",
}


def to_numpy_dtype(datatype: str) -> np.dtype[Any]:
    """numpy dtype of an OIP datatype; ValueError naming the known ones otherwise."""
    try:
        return _TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(sorted(OIP_DATATYPES))
        raise ValueError(f"unknown datatype {datatype!r}; known: {known}") from None


def from_numpy_dtype(dtype: Any) -> str:
    """OIP datatype of a numpy dtype (or anything np.dtype accepts).

    Fixed-width byte and unicode strings ('S', 'U') are BYTES too, as Triton's client does.
    """
    dt = np.dtype(dtype)
    if dt.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return _FROM_NUMPY[dt.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no OIP datatype") from None


def from_onnx_type(type_str: str) -> str:
    """OIP datatype of an ONNX Runtime type string such as 'tensor(float)'.

    Non-tensor types (sequences, maps: e.g. skl2onnx's ZipMap output) raise ValueError.
    """
    if type_str.startswith("tensor(") and type_str.endswith(")"):
        elem = type_str[len("tensor(") : -1]
        if elem in _ONNX_ELEM:
            return _ONNX_ELEM[elem]
    raise ValueError(f"ONNX type {type_str!r} is not a tensor type with an OIP datatype")


def from_openvino_type(type_name: str) -> str:
    """OIP datatype of an OpenVINO element type name (`ov.Type.get_type_name()`, e.g. 'f32')."""
    try:
        return _OPENVINO_ELEM[type_name]
    except KeyError:
        raise ValueError(f"OpenVINO element type {type_name!r} has no OIP datatype") from None
