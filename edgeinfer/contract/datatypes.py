"""OIP v2 (KServe) tensor datatypes: the names jobs, answers and manifests carry.

Their numpy and runtime counterparts live with the runtimes (runtimes/datatypes.py).
"""

from __future__ import annotations

OIP_DATATYPES: frozenset[str] = frozenset({
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
})
