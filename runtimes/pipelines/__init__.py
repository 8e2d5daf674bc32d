"""Task pipelines: pre- and post-processing around a model, chosen by the manifest's `task`.

- tensor: the model's own tensors in and out (no processing).
- image-classification: an encoded image in (JPEG, PNG, WebP; needs pillow), top-k labels
  and scores out.
- voice-activity-detection: an audio file in (WAV, FLAC, OGG; needs soundfile), speech
  segments in seconds out, with Silero VAD.
- embedding: token ids (or texts, when the version ships a tokenizer.json; needs
  tokenizers) in, one mean-pooled, L2-normalised vector per sequence out.
- text-generation: a prompt in, generated text out, whole (`run`) or as chunks
  (`run_stream`), from a KV-cached decoder; needs tokenizers.
- ocr: an encoded image in, text lines with their boxes and scores out (needs opencv); it
  runs several models (det, rec, optional cls): `session` is then a mapping role -> Session.
- image-to-text: an encoded image and a prompt in, generated text out (whole or streamed,
  as text-generation), from an image encoder and a decoder (roles encoder, decoder); needs
  pillow and tokenizers.

Each task lives in its own module, imported on first use, so that a missing optional
library (pillow, soundfile) costs only the tasks that need it; `pipeline_requirements`
says which. The settings keys of every task are documented in docs/pipelines.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeinfer.contract.tasks import KNOWN_TASKS, MULTI_MODEL_TASKS
from edgeinfer.runtimes.base import Session, one_line
from edgeinfer.runtimes.pipelines.base import MEDIA_EXTRA_HINT, Pipeline

OCR_EXTRA_HINT = "pip install 'edgeinfer[ocr]'"

__all__ = ["KNOWN_TASKS", "MULTI_MODEL_TASKS", "Pipeline", "build_pipeline", "pipeline_requirements",
           "task_module"]

# task -> (module exposing `build(settings, model_dir, session)`, optional library it
# needs as (import name, distribution name), or None).
_TASKS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "tensor": ("edgeinfer.runtimes.pipelines.tensor", None),
    "image-classification": ("edgeinfer.runtimes.pipelines.image", ("PIL", "pillow")),
    "voice-activity-detection": ("edgeinfer.runtimes.pipelines.audio", ("soundfile", "soundfile")),
    "embedding": ("edgeinfer.runtimes.pipelines.embedding", None),
    "text-generation": ("edgeinfer.runtimes.pipelines.textgen", ("tokenizers", "tokenizers")),
    "ocr": ("edgeinfer.runtimes.pipelines.ocr", ("cv2", "opencv")),  # and pillow: the ocr extra has both
    "image-to-text": ("edgeinfer.runtimes.pipelines.imagetext", ("tokenizers", "tokenizers")),  # and pillow
}
assert tuple(_TASKS) == KNOWN_TASKS  # one pipeline per task of the contract's table
# For the tasks of MULTI_MODEL_TASKS, build_pipeline takes a mapping role -> Session, and
# so does their pipeline's run.


# Tasks whose extra installs pillow beside their own library: ocr's (opencv post-processes)
# and media (image-to-text's tokenizer).
_PILLOW_TOO = ("ocr", "image-to-text")


def _missing(task: str) -> str | None:
    requirement = _TASKS[task][1]
    if requirement is None:
        return None
    needs = [("PIL", "pillow"), requirement] if task in _PILLOW_TOO else [requirement]
    hint = OCR_EXTRA_HINT if task == "ocr" else MEDIA_EXTRA_HINT
    for module, dist in needs:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or OSError from a missing shared library (libsndfile)
            return f"{dist} unavailable: {type(exc).__name__}: {one_line(exc)} ({hint})"
    return None


def pipeline_requirements() -> dict[str, str | None]:
    """Per task: why it cannot run here (a missing optional library), or None when it can.

    For `edge-agent doctor`: imports pillow, soundfile and opencv, nothing else.
    """
    return {task: _missing(task) for task in _TASKS}


def build_pipeline(
    task: str,
    settings: Mapping[str, Any],
    model_dir: Path | None,
    session: Session | Mapping[str, Session],
) -> Pipeline:
    """The pipeline of `task` for a loaded session (a mapping role -> session for the tasks
    of MULTI_MODEL_TASKS, whose models deploy, version and roll back together).

    Raises ValueError for an unknown task (naming the known ones), a task whose library is
    missing, settings that do not fit the task, or a model that does not fit the task.
    """
    pipeline: Pipeline = task_module(task).build(settings, model_dir, session)
    return pipeline


def task_module(task: str) -> ModuleType:
    """The module of `task` (its `build`, and `warmup_inputs` where the task has its own).

    Raises ValueError for an unknown task (naming the known ones) or a task whose library
    is missing.
    """
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    missing = _missing(task)
    if missing is not None:
        raise ValueError(f"task {task} cannot run here: {missing}")
    return importlib.import_module(_TASKS[task][0])
