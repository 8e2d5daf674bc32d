"""Triton's binary-data extension: tensors carried after the JSON header, in the payload's
binary section, as little-endian arrays; BYTES as a 4-byte little-endian length before
each element. Read for a request's inputs, written for an answer's outputs.
"""

from __future__ import annotations

import numpy as np

from edgeinfer.agent.protocol.request import RequestTensor
from edgeinfer.contract.errors import Code, JobError
from edgeinfer.runtimes.datatypes import to_numpy_dtype


def tensor_from_binary(
    tensor: RequestTensor, shape: tuple[int, ...], count: int, binary: memoryview, offset: int
) -> tuple[np.ndarray, int]:
    size = (tensor.parameters or {}).get("binary_data_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise JobError(
            Code.INVALID_ARGUMENT, f"input {tensor.name!r}: binary_data_size must be an integer"
        )
    if offset + size > len(binary):
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"input {tensor.name!r}: binary_data_size {size} runs past the payload's end",
        )
    if tensor.datatype == "BYTES":
        return bytes_from_binary(tensor.name, shape, count,
                                  binary[offset : offset + size]), offset + size
    dtype = to_numpy_dtype(tensor.datatype)
    if size != count * dtype.itemsize:
        raise JobError(
            Code.INVALID_ARGUMENT,
            f"input {tensor.name!r}: shape {list(shape)} of {tensor.datatype} needs "
            f"{count * dtype.itemsize} bytes, binary_data_size says {size}",
        )
    # No copy: the array views the payload (read-only), which lives as long as the job.
    array = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
    return array.reshape(shape), offset + size


def bytes_from_binary(name: str, shape: tuple[int, ...], count: int,
                       section: memoryview) -> np.ndarray:
    """Triton's binary BYTES: each element a 4-byte little-endian length, then its bytes."""
    items: list[bytes] = []
    pos = 0
    while pos < len(section):
        if pos + 4 > len(section):
            raise JobError(Code.INVALID_ARGUMENT,
                           f"input {name!r}: BYTES element length cut short at byte {pos}")
        length = int.from_bytes(section[pos : pos + 4], "little")
        pos += 4
        if pos + length > len(section):
            raise JobError(Code.INVALID_ARGUMENT,
                           f"input {name!r}: BYTES element of {length} bytes runs past its data")
        items.append(bytes(section[pos : pos + length]))
        pos += length
        if len(items) > count:
            break
    if len(items) != count:
        raise JobError(Code.INVALID_ARGUMENT,
                       f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, "
                       f"the binary data holds {len(items)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def bytes_to_binary(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(len(raw).to_bytes(4, "little") + raw)
    return b"".join(parts)
