"""The `image-to-text` task: an image and a prompt in, generated text out, whole or streamed.

Two models of one version (MULTI_MODEL_TASKS): the `encoder` turns the image into
embeddings, the `decoder` is a text-generation decoder (KV cache, as `textgen` describes)
with one more input, `image_embeds` FP32 [batch, prefix, dim], whose rows it puts before the
step's tokens. The image's embeddings go in on the first step (prefill, with the prompt),
an empty [1, 0, dim] on every step after; they take `image_tokens` positions of the context.

A job sends `image` (BYTES [1]: one JPEG, PNG or WebP file) and `text_input` (BYTES [1], the
prompt), and may send text-generation's knobs (`max_tokens`, `temperature`, `top_p`,
`top_k`, `seed`, `stop`). The image is decoded and fitted to the encoder's input by the
image-classification task's preprocessing (its settings under `image`; grey by default);
the prompt and the generation are text-generation's own: this pipeline runs
`textgen.TextGeneration` on a per-job view of the decoder that adds the image's embeddings.
So the answer (`text_output`, `token_ids`, `finish_reason`), its chunks when streamed, and
cancellation are those of text-generation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from edgeinfer.contract.tasks import MULTI_MODEL_TASKS
from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.pipelines import image, textgen
from edgeinfer.runtimes.pipelines.base import (
    StreamingPipeline,
    media_items,
    parse_settings,
    pick_input,
    require,
)

TASK = "image-to-text"
IMAGE_INPUT = "image"
MODEL_ROLES: tuple[tuple[str, ...], tuple[str, ...]] = MULTI_MODEL_TASKS[TASK]


class ImageToTextSettings(textgen.TextGenSettings, forbid_unknown_fields=True, frozen=True):
    # text-generation's keys, with fewer tokens by default: captions are short.
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 16
    # image-classification's preprocessing keys, for the encoder's input (docs/pipelines.md).
    image: dict[str, Any] = msgspec.field(default_factory=dict)
    prefix_input: str = "image_embeds"  # the decoder's input for the image's embeddings


class _WithImage:
    """The decoder as text-generation sees it, for one job: `prefix_input` is hidden, and
    fed with the image's embeddings on the first call (the prefill) and none after."""

    def __init__(self, decoder: Session, name: str, embeds: np.ndarray | None) -> None:
        self._decoder = decoder
        self._name = name
        self._next = embeds
        self._empty = None if embeds is None else embeds[:, :0]
        self.runtime = decoder.runtime
        self.device = decoder.device
        self.inputs = [s for s in decoder.inputs if s.name != name]
        self.outputs = decoder.outputs

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        if self._next is None:
            raise RuntimeError(f"{TASK}: the decoder view of a pipeline's build runs no job")
        feed = {**inputs, self._name: self._next}
        self._next = self._empty
        return self._decoder.infer(feed, outputs)

    def close(self) -> None:
        """The decoder belongs to the version: closed with it, never by a job."""


def _roles(sessions: Session | Mapping[str, Session]) -> Mapping[str, Session]:
    required, optional = MODEL_ROLES
    if not isinstance(sessions, Mapping):
        raise ValueError(f"{TASK} runs several models: give a mapping of role -> session "
                         f"({', '.join(required)})")
    missing = [r for r in required if r not in sessions]
    unknown = [r for r in sessions if r not in required + optional]
    if missing or unknown:
        raise ValueError(f"{TASK}: missing model(s) {', '.join(missing) or '-'}, unknown role(s) "
                         f"{', '.join(unknown) or '-'}; its roles are {', '.join(required)}")
    return sessions


class ImageToText(StreamingPipeline):
    task = TASK

    def __init__(self, cfg: ImageToTextSettings, tokenizer: Any, config: Mapping[str, Any],
                 sessions: Mapping[str, Session]) -> None:
        encoder, decoder = sessions["encoder"], sessions["decoder"]
        try:
            image_cfg = parse_settings(image.ImageSettings, {"color": "L", **cfg.image}, TASK)
            # image-classification's decoding and fitting of an image, for the encoder's input
            self._pre = image.ImageClassification(image_cfg, None, encoder)
        except ValueError as exc:
            raise ValueError(f"{TASK} settings image (the encoder's input): {exc}") from None
        self._input = pick_input(encoder, image_cfg.input, TASK).name
        floats = [o for o in encoder.outputs if o.datatype == "FP32"]
        if len(floats) != 1 or len(floats[0].shape) != 3 or floats[0].shape[1] <= 0:
            raise ValueError(f"{TASK}: the encoder needs one FP32 output [batch, image_tokens, dim] "
                             "with a fixed image_tokens; it has "
                             + ", ".join(f"{o.name} {o.datatype} {list(o.shape)}" for o in encoder.outputs))
        self._embeds = floats[0].name
        tokens, dim = floats[0].shape[1], floats[0].shape[2]
        prefix = [s for s in decoder.inputs if s.name == cfg.prefix_input]
        if not prefix:
            raise ValueError(f"{TASK}: the decoder has no input {cfg.prefix_input!r} for the image's "
                             f"embeddings; it has {', '.join(s.name for s in decoder.inputs)}")
        if len(prefix[0].shape) != 3 or prefix[0].shape[1] > 0 or (
                dim > 0 and prefix[0].shape[2] > 0 and prefix[0].shape[2] != dim):
            raise ValueError(f"{TASK}: decoder input {cfg.prefix_input} {list(prefix[0].shape)} does "
                             f"not take the encoder's {self._embeds} {list(floats[0].shape)}: it "
                             "needs [batch, prefix (dynamic), dim]")
        self._prefix = cfg.prefix_input
        text = textgen.TextGeneration(cfg, tokenizer, config, _WithImage(decoder, self._prefix, None))
        if text.context_length is not None:  # the image's embeddings take positions too
            if text.context_length <= tokens:
                raise ValueError(f"{TASK}: a context of {text.context_length} positions leaves "
                                 f"none for text after the image's {tokens}")
            cfg = msgspec.structs.replace(cfg, context_length=text.context_length - tokens)
            text = textgen.TextGeneration(cfg, tokenizer, config, _WithImage(decoder, self._prefix, None))
        self._text = text

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(IMAGE_INPUT, "BYTES", (1,)), *self._text.inputs()]

    def optional_inputs(self) -> list[TensorSpec]:
        return self._text.optional_inputs()

    def outputs(self) -> list[TensorSpec]:
        return self._text.outputs()

    def _decoder_for(self, session: Session | Mapping[str, Session],
                     inputs: Mapping[str, np.ndarray]) -> _WithImage:
        sessions = _roles(session)
        images = media_items(require(inputs, IMAGE_INPUT), IMAGE_INPUT)
        if len(images) != 1:
            raise ValueError(f"input {IMAGE_INPUT} must hold one image, got {len(images)}")
        pixels = self._pre.preprocess(images[0])
        embeds = sessions["encoder"].infer({self._input: pixels[None]}, [self._embeds])[self._embeds]
        return _WithImage(sessions["decoder"], self._prefix, embeds)

    def run(self, session: Session | Mapping[str, Session], inputs: Mapping[str, np.ndarray],
            cancel: threading.Event | None = None) -> dict[str, np.ndarray]:
        """The whole answer: `text_output` [1], `token_ids` [n], `finish_reason` [1]."""
        return self._text.run(self._decoder_for(session, inputs), inputs, cancel)

    def run_stream(self, session: Session | Mapping[str, Session], inputs: Mapping[str, np.ndarray],
                   cancel: threading.Event | None = None) -> Iterator[dict[str, np.ndarray]]:
        """text-generation's chunks; the job (image and prompt) is checked before this returns."""
        return self._text.run_stream(self._decoder_for(session, inputs), inputs, cancel)


def warmup_inputs(role: str) -> dict[str, np.ndarray]:
    """No inputs of the task's own: each model warms up on synthetic ones fitted to its
    inputs (an 8x8 grey image; one token, one image row and a one-long cache)."""
    if role not in MODEL_ROLES[0] + MODEL_ROLES[1]:
        raise ValueError(f"{TASK}: no role {role!r}; roles are {', '.join(MODEL_ROLES[0])}")
    return {}


def build(settings: Mapping[str, Any], model_dir: Path | None,
          session: Session | Mapping[str, Session]) -> ImageToText:
    cfg = parse_settings(ImageToTextSettings, settings, TASK)
    sessions = _roles(session)
    tokenizer, config = textgen.load_tokenizer(cfg, model_dir)
    return ImageToText(cfg, tokenizer, config, sessions)
