"""The `embedding` task: token ids in, one L2-normalised vector per sequence out.

The job sends the encoder's own inputs (`input_ids`, and `attention_mask` and
`token_type_ids` when the model takes them: tokenising is the client's business). The
encoder's last hidden state [N, T, D] is mean-pooled over the tokens the attention mask
keeps (over all tokens when the model has no mask input), or the first token's vector is
taken (`pooling: cls`), and each vector is divided by its L2 norm, as sentence-transformers
does (norm floored at 1e-12). A model whose output is already pooled [N, D] is only
normalised.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from runtimes.base import Session, TensorSpec
from runtimes.pipelines.base import parse_settings

TASK = "embedding"
EPS = 1e-12


class EmbeddingSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    output: str | None = None  # default: the model's first rank-3 output, else its only one
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    mask_input: str = "attention_mask"


class Embedding:
    task = TASK

    def __init__(self, cfg: EmbeddingSettings, session: Session) -> None:
        self._cfg = cfg
        self._inputs = list(session.inputs)
        outs = session.outputs
        if cfg.output is not None:
            found = [o for o in outs if o.name == cfg.output]
            if not found:
                names = ", ".join(o.name for o in outs)
                raise ValueError(f"{TASK}: the model has no output {cfg.output!r}; it has {names}")
            spec = found[0]
        else:
            rank3 = [o for o in outs if len(o.shape) == 3]
            if rank3:
                spec = rank3[0]
            elif len(outs) == 1:
                spec = outs[0]
            else:
                names = ", ".join(o.name for o in outs)
                raise ValueError(
                    f"{TASK}: cannot tell which output is the hidden state ({names}); set 'output'"
                )
        if spec.datatype not in ("FP32", "FP16", "FP64"):
            raise ValueError(f"{TASK}: output {spec.name} is {spec.datatype}, not a float tensor")
        self._output = spec
        self._mask = cfg.mask_input if any(s.name == cfg.mask_input for s in self._inputs) else None
        self._dim = spec.shape[-1] if spec.shape else -1

    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("embedding", "FP32", (-1, self._dim))]

    def run(self, session: Session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        hidden = session.infer(inputs, [self._output.name])[self._output.name]
        mask = np.asarray(inputs[self._mask]) if self._mask is not None else None
        return {"embedding": self.pool(hidden, mask)}

    def pool(self, hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        h = hidden.astype(np.float32, copy=False)
        if h.ndim == 3:
            if self._cfg.pooling == "cls":
                h = h[:, 0, :]
            elif mask is None:
                h = h.mean(axis=1)
            else:
                if mask.shape != h.shape[:2]:
                    raise ValueError(
                        f"{self._mask} has shape {list(mask.shape)}; the hidden state is "
                        f"{list(h.shape)}"
                    )
                m = (mask != 0).astype(np.float32)[:, :, None]
                h = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        elif h.ndim != 2:
            raise ValueError(f"{TASK}: output {self._output.name} has rank {h.ndim}; need 2 or 3")
        if self._cfg.normalize:
            h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), EPS)
        return np.ascontiguousarray(h, dtype=np.float32)


def build(settings: Mapping[str, Any], model_dir: Path | None, session: Session) -> Embedding:
    return Embedding(parse_settings(EmbeddingSettings, settings, TASK), session)
