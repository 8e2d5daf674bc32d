"""The `embedding` task: token ids, or texts, in; one L2-normalised vector per sequence out.

The job sends the encoder's own inputs (`input_ids`, and `attention_mask` and
`token_type_ids` when the model takes them). When the model's folder holds a tokenizer
(`tokenizer.json`, read with the `tokenizers` library, installed beside the model through
the manifest's `files`), a job may send `text` instead: BYTES [N], one UTF-8 string per
sequence. The texts are tokenised (special tokens added, truncated to `max_length`), padded
to the longest of the batch (or to the model's fixed sequence length), and the model gets
the ids, the attention mask and the token type ids it takes. A model without a mask input
gets one text per call, unpadded, so that padding never changes a vector.

The encoder's last hidden state [N, T, D] is mean-pooled over the tokens the attention mask
keeps (over all tokens when the model has no mask input), or the first token's vector is
taken (`pooling: cls`), and each vector is divided by its L2 norm, as sentence-transformers
does (norm floored at 1e-12). A model whose output is already pooled [N, D] is only
normalised.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from edgeinfer.runtimes.base import Session, TensorSpec, one_line
from edgeinfer.runtimes.datatypes import to_numpy_dtype
from edgeinfer.runtimes.pipelines.base import MEDIA_EXTRA_HINT, Pipeline, parse_settings

TASK = "embedding"
EPS = 1e-12
TEXT_INPUT = "text"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_LENGTH = 512  # BERT's positions, when neither the tokenizer nor the model says

Positive = Annotated[int, msgspec.Meta(ge=1)]


class EmbeddingSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    output: str | None = None  # default: the model's first rank-3 output, else its only one
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    mask_input: str = "attention_mask"
    # Text in (only when the model's folder holds the tokenizer):
    tokenizer_file: str | None = None  # default: tokenizer.json, when the folder has one
    ids_input: str = "input_ids"
    type_input: str = "token_type_ids"  # fed zeros (the tokenizer's type ids) if the model has it
    max_length: Positive | None = None  # tokens per text, special tokens included
    truncation: bool = True  # False: a longer text is refused instead of cut
    add_special_tokens: bool = True  # [CLS] ... [SEP], as the tokenizer's post-processor says


def _plain_file(model_dir: Path | None, name: str) -> Path | None:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(
            f"{TASK} settings: tokenizer_file {name!r} must be a plain file name inside the "
            "model's folder"
        )
    return None if model_dir is None else model_dir / rel


def _load_tokenizer(cfg: EmbeddingSettings, model_dir: Path | None) -> tuple[Any, str] | None:
    """The tokenizer and its file name, or None when the model's folder has none."""
    name = cfg.tokenizer_file or TOKENIZER_FILE
    path = _plain_file(model_dir, name)
    if path is None or not path.is_file():
        if cfg.tokenizer_file is not None:
            raise ValueError(
                f"{TASK}: tokenizer_file {name!r} is not in the model's folder (list it in the "
                "manifest entry's files)"
            )
        return None
    try:
        tokenizers = importlib.import_module("tokenizers")  # only models with a tokenizer need it
    except Exception as exc:  # ImportError, or a broken native library
        raise ValueError(
            f"{TASK}: the model ships {name}, but tokenizers is unavailable: "
            f"{type(exc).__name__}: {one_line(exc)} ({MEDIA_EXTRA_HINT})"
        ) from None
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass for a bad file
        raise ValueError(f"{TASK}: cannot load the tokenizer {name}: {one_line(exc)}") from None
    return tokenizer, name


def _text(value: Any, index: int) -> str:
    where = f"input {TEXT_INPUT}[{index}]"
    if isinstance(value, np.bytes_):
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where} is not UTF-8 text: {exc}") from None
    elif isinstance(value, str):
        text = value
    else:
        raise ValueError(f"{where} must hold UTF-8 text as bytes, got {type(value).__name__}")
    if not text:
        raise ValueError(f"{where} is empty: send some text")
    return text


class _TextFeed:
    """Texts -> the model's token inputs, in calls of at most `step` texts."""

    def __init__(self, cfg: EmbeddingSettings, tokenizer: Any, name: str,
                 session: Session, mask: str | None) -> None:
        specs = {s.name: s for s in session.inputs}
        if cfg.ids_input not in specs:
            raise ValueError(
                f"{TASK}: the model has no input {cfg.ids_input!r} to feed the tokens of {name} "
                f"to; it has {', '.join(specs)} (set 'ids_input')"
            )
        ids_spec = specs[cfg.ids_input]
        self.types = cfg.type_input if cfg.type_input in specs else None
        fed = {cfg.ids_input, mask, self.types}
        other = [n for n in specs if n not in fed]
        if other:
            raise ValueError(
                f"{TASK}: cannot feed model input(s) {', '.join(other)} from text; the "
                f"tokenizer gives {cfg.ids_input}, {cfg.mask_input} and {cfg.type_input}"
            )
        if TEXT_INPUT in specs:
            raise ValueError(f"{TASK}: the model has an input named {TEXT_INPUT!r} itself")
        self.ids = cfg.ids_input
        self.mask = mask
        self.dtypes = {n: to_numpy_dtype(specs[n].datatype) for n in fed if n is not None}
        shape = ids_spec.shape
        fixed_len = shape[1] if len(shape) == 2 and shape[1] > 0 else None
        fixed_batch = shape[0] if len(shape) == 2 and shape[0] > 0 else None
        own = tokenizer.truncation  # the tokenizer.json's own settings, e.g. 128 for MiniLM
        max_length = cfg.max_length
        if max_length is None:
            max_length = int(own["max_length"]) if own else DEFAULT_MAX_LENGTH
            if fixed_len is not None:
                max_length = min(max_length, fixed_len)
        elif fixed_len is not None and max_length > fixed_len:
            raise ValueError(
                f"{TASK} settings: max_length {max_length} is over the model's fixed sequence "
                f"length {fixed_len}"
            )
        self.max_length = max_length
        self.pad_to = fixed_len
        pad = tokenizer.padding
        if pad and pad.get("pad_id") is not None:
            self.pad_id = int(pad["pad_id"])
        else:
            found = [tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>")]
            self.pad_id = next((int(i) for i in found if i is not None), 0)
        # Padding is ours (numpy); truncation is the tokenizer's, which keeps the special
        # tokens (a cut text still ends with [SEP]).
        tokenizer.no_padding()
        special = tokenizer.num_special_tokens_to_add(False) if cfg.add_special_tokens else 0
        if max_length <= special:
            raise ValueError(
                f"{TASK} settings: max_length {max_length} leaves no room for text beside the "
                f"tokenizer's {special} special tokens"
            )
        if cfg.truncation:
            try:
                tokenizer.enable_truncation(max_length)
            except Exception as exc:
                raise ValueError(f"{TASK} settings: max_length {max_length}: {one_line(exc)}") from None
        else:
            tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.truncation = cfg.truncation
        self.special = cfg.add_special_tokens
        # Without a mask input the model would see the padding: one text per call, unpadded.
        self.step = 1 if mask is None else (fixed_batch or 0)
        try:
            self.encode(["probe"])
        except ValueError as exc:
            raise ValueError(f"{TASK}: the tokenizer {name} does not work with these settings: "
                             f"{exc}") from None

    def encode(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, type ids) per text; refuses a text that gives no tokens, or too many."""
        try:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=self.special)
        except Exception as exc:
            raise ValueError(f"input {TEXT_INPUT}: the tokenizer failed: {one_line(exc)}") from None
        out = []
        for i, enc in enumerate(encodings):
            ids = list(enc.ids)
            if not ids:
                raise ValueError(f"input {TEXT_INPUT}[{i}] gives no tokens: send some text")
            if len(ids) > self.max_length:  # only without truncation
                off = "" if self.truncation else " (truncation is off for this model)"
                raise ValueError(
                    f"input {TEXT_INPUT}[{i}] is {len(ids)} tokens long, over max_length "
                    f"{self.max_length}{off}"
                )
            out.append((ids, list(enc.type_ids)))
        return out

    def feeds(self, texts: list[str]) -> list[tuple[dict[str, np.ndarray], np.ndarray, int]]:
        """Per model call: its inputs, the attention mask [n, T] and how many rows are real."""
        encoded = self.encode(texts)
        step = self.step or len(encoded)
        calls = []
        for start in range(0, len(encoded), step):
            part = encoded[start : start + step]
            real = len(part)
            part += [part[-1]] * (step - real)  # a fixed batch: fill it, then drop the copies
            width = self.pad_to or max(len(ids) for ids, _ in part)
            ids = np.full((len(part), width), self.pad_id, np.int64)
            types = np.zeros((len(part), width), np.int64)
            mask = np.zeros((len(part), width), np.int64)
            for row, (tok, typ) in enumerate(part):
                ids[row, : len(tok)] = tok
                types[row, : len(typ)] = typ
                mask[row, : len(tok)] = 1
            feed = {self.ids: ids.astype(self.dtypes[self.ids], copy=False)}
            if self.mask is not None:
                feed[self.mask] = mask.astype(self.dtypes[self.mask], copy=False)
            if self.types is not None:
                feed[self.types] = types.astype(self.dtypes[self.types], copy=False)
            calls.append((feed, mask, real))
        return calls


class Embedding(Pipeline):
    task = TASK

    def __init__(self, cfg: EmbeddingSettings, session: Session,
                 tokenizer: tuple[Any, str] | None = None) -> None:
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
        self._text = None if tokenizer is None else _TextFeed(cfg, *tokenizer, session, self._mask)

    @property
    def takes_text(self) -> bool:
        """Whether jobs may send `text` (the model's folder holds a tokenizer)."""
        return self._text is not None

    @property
    def max_length(self) -> int | None:
        """Tokens per text (special tokens included), or None without a tokenizer."""
        return None if self._text is None else self._text.max_length

    def inputs(self) -> list[TensorSpec]:
        # With a tokenizer a job sends either `text` or the token ids: none is required as
        # such, `run` checks that one of the two came whole.
        return [] if self._text is not None else list(self._inputs)

    def optional_inputs(self) -> list[TensorSpec]:
        if self._text is None:
            return []
        return [TensorSpec(TEXT_INPUT, "BYTES", (-1,)), *self._inputs]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("embedding", "FP32", (-1, self._dim))]

    def run(self, session: Session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._text is not None:
            if TEXT_INPUT in inputs:
                given = [s.name for s in self._inputs if s.name in inputs]
                if given:
                    raise ValueError(
                        f"send either {TEXT_INPUT} or the token ids, not both (got {TEXT_INPUT} "
                        f"and {', '.join(given)})"
                    )
                return {"embedding": self.embed_texts(session, inputs[TEXT_INPUT])}
            missing = [s.name for s in self._inputs if s.name not in inputs]
            if missing:
                names = ", ".join(s.name for s in self._inputs)
                raise ValueError(
                    f"missing input {', '.join(repr(m) for m in missing)}: send {TEXT_INPUT} "
                    f"(BYTES [N], UTF-8) or the token ids ({names})"
                )
        hidden = session.infer(inputs, [self._output.name])[self._output.name]
        mask = np.asarray(inputs[self._mask]) if self._mask is not None else None
        return {"embedding": self.pool(hidden, mask)}

    def texts(self, array: np.ndarray) -> list[str]:
        """The strings of a `text` input, in row-major order."""
        values = np.asarray(array, dtype=object).reshape(-1)
        if values.size == 0:
            raise ValueError(f"input {TEXT_INPUT} holds no texts")
        return [_text(v, i) for i, v in enumerate(values)]

    def tokenize(self, texts: list[str]) -> list[tuple[dict[str, np.ndarray], np.ndarray, int]]:
        """The model calls for `texts`: (inputs, attention mask, rows that are real) each."""
        if self._text is None:
            raise ValueError(f"{TASK}: this model has no tokenizer: send the token ids")
        return self._text.feeds(texts)

    def embed_texts(self, session: Session, array: np.ndarray) -> np.ndarray:
        vectors = []
        for feed, mask, real in self.tokenize(self.texts(array)):
            hidden = session.infer(feed, [self._output.name])[self._output.name]
            # Pooled over the real tokens even when the model takes no mask (a fixed length).
            vectors.append(self.pool(hidden, mask)[:real])
        return np.concatenate(vectors)

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
                        f"{self._mask or 'the attention mask'} has shape {list(mask.shape)}; "
                        f"the hidden state is {list(h.shape)}"
                    )
                m = (mask != 0).astype(np.float32)[:, :, None]
                h = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        elif h.ndim != 2:
            raise ValueError(f"{TASK}: output {self._output.name} has rank {h.ndim}; need 2 or 3")
        if self._cfg.normalize:
            h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), EPS)
        return np.ascontiguousarray(h, dtype=np.float32)


def build(settings: Mapping[str, Any], model_dir: Path | None, session: Session) -> Embedding:
    cfg = parse_settings(EmbeddingSettings, settings, TASK)
    return Embedding(cfg, session, _load_tokenizer(cfg, model_dir))
