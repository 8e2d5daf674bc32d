"""What every task pipeline offers, and the helpers the task modules share.

A pipeline sits between a job's tensors and a model's session: it decodes and
pre-processes what a job sends (an encoded image, an audio file, token ids), runs the
session, and post-processes what the model gives back (top-k labels, speech segments,
pooled embeddings). It holds no per-job state, so one pipeline serves every thread.
Every task's pipeline is a `Pipeline` (a `StreamingPipeline` when it streams and can be
cancelled: text generation), so its caller asks typed questions and probes for nothing.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import msgspec
import numpy as np

from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.structcheck import StructError, convert

# The extra that installs the optional decoders (pillow, soundfile).
MEDIA_EXTRA_HINT = "pip install 'edgeinfer[media]'"


class Pipeline(ABC):
    """One task on one model: what a job sends, what the answer holds, and how to get there."""

    task: ClassVar[str]

    @abstractmethod
    def inputs(self) -> list[TensorSpec]:
        """The tensors a job must send (their datatypes and shapes, -1 = any)."""

    def optional_inputs(self) -> list[TensorSpec]:
        """Tensors a job may add to `inputs()` (knobs; the settings' defaults stand in for
        those it leaves out). None unless the task takes some."""
        return []

    @abstractmethod
    def outputs(self) -> list[TensorSpec]:
        """The tensors the answer holds."""

    @abstractmethod
    def run(self, session: Session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pre-process, infer, post-process. Bad media raise ValueError saying what is wrong."""


class StreamingPipeline(Pipeline):
    """A pipeline whose answer can come in chunks, and whose running job a cancel request
    can stop: the caller sets `cancel` and the run ends early with what it has."""

    @abstractmethod
    def run(self, session: Session, inputs: Mapping[str, np.ndarray],
            cancel: threading.Event | None = None) -> dict[str, np.ndarray]:
        """The whole answer at once."""

    @abstractmethod
    def run_stream(self, session: Session, inputs: Mapping[str, np.ndarray],
                   cancel: threading.Event | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The answer in chunks as it becomes final, the last one ending it. The job is
        checked before this returns: a bad one raises ValueError here."""


S = TypeVar("S", bound=msgspec.Struct)


def parse_settings(cls: type[S], settings: Mapping[str, Any], task: str) -> S:
    """Settings as a typed struct; unknown keys and wrong types are a ValueError naming the key.

    Pure: nothing is read or downloaded while settings are checked.
    """
    try:
        return convert(dict(settings), cls)
    except StructError as exc:
        raise ValueError(f"{task} settings: {exc}") from None


def pick_input(session: Session, wanted: str | None, task: str) -> TensorSpec:
    """The model input a pipeline feeds: the one named in settings, or the model's only one."""
    names = [s.name for s in session.inputs]
    if wanted is not None:
        for spec in session.inputs:
            if spec.name == wanted:
                return spec
        raise ValueError(f"{task}: the model has no input {wanted!r}; it has {', '.join(names)}")
    if len(session.inputs) != 1:
        raise ValueError(
            f"{task}: the model has {len(names)} inputs ({', '.join(names)}); "
            "say which one takes the data with the setting 'input'"
        )
    return session.inputs[0]


def media_items(array: np.ndarray, name: str) -> list[bytes]:
    """The encoded files of a BYTES input, in row-major order; an empty one is refused."""
    items: list[bytes] = []
    for i, value in enumerate(np.asarray(array, dtype=object).reshape(-1)):
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, np.bytes_):
            data = value.tobytes()
        else:
            raise ValueError(
                f"input {name}[{i}] must hold the bytes of an encoded file, got {type(value).__name__}"
            )
        if not data:
            raise ValueError(f"input {name}[{i}] is empty: it must hold the bytes of an encoded file")
        items.append(data)
    if not items:
        raise ValueError(f"input {name} holds no files")
    return items


def require(inputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return inputs[name]
    except KeyError:
        raise ValueError(f"missing input {name!r}") from None


def sniff_image(data: bytes) -> str:
    """What the first bytes say the file is, for error messages (pillow may fail before it knows)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG image"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG image"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP image"
    return "image"
