"""The `tensor` task: the model's own inputs and outputs, passed through untouched."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.pipelines.base import Pipeline

TASK = "tensor"


class TensorPipeline(Pipeline):
    task = TASK

    def __init__(self, session: Session) -> None:
        self._inputs = list(session.inputs)
        self._outputs = list(session.outputs)

    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(self, session: Session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return session.infer(inputs)


def build(settings: Mapping[str, Any], model_dir: Path | None, session: Session) -> TensorPipeline:
    if settings:
        raise ValueError(f"tensor settings: the tensor task takes no settings, got {', '.join(settings)}")
    return TensorPipeline(session)
