"""The `text-generation` task: a prompt in, generated text out, whole or as a stream of chunks.

The model is a decoder-only ONNX export with a KV cache, shaped like Hugging Face's
(optimum) exports: input `input_ids` INT64 [1, T] and one `past_*` input per cached tensor
[1, heads, past, head_dim]; output `logits` [1, T, vocab] and one `present_*` output per
`past_*` input (`past_key_values.<i>.key` -> `present.<i>.key`, `past_key_<i>` ->
`present_key_<i>`). An `attention_mask` input gets ones, a `position_ids` input the
positions. The model folder holds the tokenizer (`tokenizer.json`, read with the
`tokenizers` library) and may hold `config.json` / `generation_config.json`, from which
the context length (`max_position_embeddings`) and `eos_token_id` are taken.

A job sends `text_input` (BYTES [1], UTF-8), and may send `max_tokens`, `temperature`,
`top_p`, `top_k`, `seed` and `stop` (stop strings). The prompt is run once (prefill), then
one token per step, each step feeding the previous step's `present_*` back as `past_*`.
Temperature 0 is greedy; above it, top-k and then top-p (nucleus) filtering and a draw from
a numpy generator seeded with `seed`, so one seed gives one answer. Generation stops at
`max_tokens` (finish reason `length`), an end-of-sequence token (`eos`: the token is in
`token_ids`, not in the text), a stop string (`stop`: the text ends before it) or a
cancelled job (`cancelled`: the caller set the job's `threading.Event`).

`run_stream` yields chunks as text becomes final: a chunk's text is held back while it
may still turn into a stop string or ends inside a multi-byte character. `run` is the
concatenation of those chunks. The pipeline holds no per-job state: one serves every thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
from tokenizers import Tokenizer

from edgeinfer.runtimes.base import Session, TensorSpec
from edgeinfer.runtimes.datatypes import to_numpy_dtype
from edgeinfer.runtimes.pipelines.base import StreamingPipeline, parse_settings, require

TASK = "text-generation"
TEXT_INPUT = "text_input"
IDS_INPUT = "input_ids"
LOGITS_OUTPUT = "logits"

# Finish reasons: the last chunk of a stream has one of these, every other chunk b"".
FINISH_LENGTH = "length"
FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_CANCELLED = "cancelled"

Positive = Annotated[int, msgspec.Meta(ge=1)]


class TextGenSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tokenizer_file: str = "tokenizer.json"  # inside the model's folder
    max_tokens: Positive = 64  # when the job sends none
    max_tokens_limit: Positive = 1024  # a job asking for more is refused
    context_length: Positive | None = None  # default: config.json max_position_embeddings
    eos_token_ids: tuple[int, ...] | None = None  # default: (generation_)config.json eos_token_id
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # default; 0 = greedy
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0 = no top-k filter
    stop: tuple[str, ...] = ()  # default stop strings, when the job sends none
    max_prompt_bytes: Positive = 65536


@dataclass(frozen=True)
class _Cache:
    past: str  # model input
    present: str  # model output fed back as `past` next step
    heads: int
    head_dim: int
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]


class Cancellations:
    """Job id -> cancel event, for a caller that cancels by id (the scheduler).

    `register` before running the job and pass the event to `run`/`run_stream`; `cancel`
    from any thread; `release` once the job is answered.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}

    def register(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(job_id, threading.Event())

    def cancel(self, job_id: str) -> bool:
        """True when the job was running (registered) and is now told to stop."""
        with self._lock:
            event = self._events.get(job_id)
        if event is None:
            return False
        event.set()
        return True

    def release(self, job_id: str) -> None:
        with self._lock:
            self._events.pop(job_id, None)


def _plain_file(model_dir: Path | None, name: str, key: str) -> Path:
    rel = Path(name)
    if model_dir is None:
        raise ValueError(f"{TASK}: needs the model's folder to read {name} from")
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(
            f"{TASK} settings: {key} {name!r} must be a plain file name inside the model's folder"
        )
    return model_dir / rel


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{TASK}: cannot read {path.name}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _eos_from(config: Mapping[str, Any]) -> tuple[int, ...] | None:
    value = config.get("eos_token_id")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _present_name(past: str) -> str:
    if past.startswith("past_key_values"):
        return "present" + past[len("past_key_values") :]
    return "present" + past[len("past") :]


def _scalar(inputs: Mapping[str, np.ndarray], name: str, kind: str) -> Any:
    """An optional one-element input as a Python number, or None when the job did not send it."""
    if name not in inputs:
        return None
    arr = np.asarray(inputs[name])
    if arr.size != 1 or arr.dtype.kind not in kind:
        what = "an integer" if kind == "iu" else "a number"
        raise ValueError(f"input {name} must hold one element, {what}; got {arr.dtype} {list(arr.shape)}")
    return arr.reshape(-1)[0].item()


def _text(value: Any, name: str) -> str:
    if isinstance(value, np.bytes_):
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"input {name} is not UTF-8 text: {exc}") from None
    if isinstance(value, str):
        return value
    raise ValueError(f"input {name} must hold UTF-8 text as bytes, got {type(value).__name__}")


def sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    """One token from a row of logits: argmax at temperature 0, else top-k, top-p, then a draw."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]  # smallest set reaching top_p
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.size - 1))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters may still change: an unfinished character, or a stop string's start."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                n = max(n, k)
                break
    return n


def _chunk(text: str, ids: list[int], finish: str) -> dict[str, np.ndarray]:
    return {
        "text_output": np.array([text.encode("utf-8")], dtype=object),
        "token_ids": np.asarray(ids, dtype=np.int64),
        "finish_reason": np.array([finish.encode()], dtype=object),
    }


class TextGeneration(StreamingPipeline):
    task = TASK

    def __init__(
        self, cfg: TextGenSettings, tokenizer: Any, config: Mapping[str, Any], session: Session
    ) -> None:
        if cfg.max_tokens > cfg.max_tokens_limit:
            raise ValueError(
                f"{TASK} settings: max_tokens {cfg.max_tokens} is over max_tokens_limit "
                f"{cfg.max_tokens_limit}"
            )
        self._cfg = cfg
        self._tok = tokenizer
        names = {s.name: s for s in session.inputs}
        if IDS_INPUT not in names:
            raise ValueError(f"{TASK}: the model has no input {IDS_INPUT}; it has {', '.join(names)}")
        outs = {s.name: s for s in session.outputs}
        if LOGITS_OUTPUT not in outs:
            raise ValueError(f"{TASK}: the model has no output {LOGITS_OUTPUT}; it has {', '.join(outs)}")
        self._ids_dtype = to_numpy_dtype(names[IDS_INPUT].datatype)
        self._mask_dtype = (
            to_numpy_dtype(names["attention_mask"].datatype) if "attention_mask" in names else None
        )
        self._pos_dtype = to_numpy_dtype(names["position_ids"].datatype) if "position_ids" in names else None
        caches: list[_Cache] = []
        for spec in session.inputs:
            if spec.name in (IDS_INPUT, "attention_mask", "position_ids"):
                continue
            if not spec.name.startswith("past"):
                raise ValueError(
                    f"{TASK}: cannot feed model input {spec.name}: it is not a token, mask, "
                    "position or past input"
                )
            present = _present_name(spec.name)
            if present not in outs:
                raise ValueError(f"{TASK}: the model's cache input {spec.name} has no output {present}")
            if len(spec.shape) != 4 or spec.shape[1] <= 0 or spec.shape[3] <= 0:
                raise ValueError(
                    f"{TASK}: cache input {spec.name} has shape {list(spec.shape)}; need "
                    "[batch, heads, past, head_dim] with fixed heads and head_dim"
                )
            caches.append(
                _Cache(spec.name, present, spec.shape[1], spec.shape[3], to_numpy_dtype(spec.datatype))
            )
        if not caches:
            raise ValueError(f"{TASK}: the model has no past_* inputs: it needs a KV-cache export")
        self._caches = caches
        self._fetch = [LOGITS_OUTPUT, *(c.present for c in caches)]
        ctx = cfg.context_length
        if ctx is None:
            for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
                if isinstance(config.get(key), int) and config[key] > 0:
                    ctx = int(config[key])
                    break
        self._context = ctx
        self._eos = frozenset(cfg.eos_token_ids if cfg.eos_token_ids is not None else _eos_from(config) or ())
        self._vocab = outs[LOGITS_OUTPUT].shape[-1] if outs[LOGITS_OUTPUT].shape else -1

    @property
    def context_length(self) -> int | None:
        return self._context

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(TEXT_INPUT, "BYTES", (1,))]

    def optional_inputs(self) -> list[TensorSpec]:
        """Inputs a job may add; the settings' defaults stand in for those it leaves out."""
        return [
            TensorSpec("max_tokens", "INT32", (1,)),
            TensorSpec("temperature", "FP32", (1,)),
            TensorSpec("top_p", "FP32", (1,)),
            TensorSpec("top_k", "INT32", (1,)),
            TensorSpec("seed", "UINT64", (1,)),
            TensorSpec("stop", "BYTES", (-1,)),
        ]

    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec("text_output", "BYTES", (1,)),
            TensorSpec("token_ids", "INT64", (-1,)),
            TensorSpec("finish_reason", "BYTES", (1,)),
        ]

    def _request(self, inputs: Mapping[str, np.ndarray]) -> _Request:
        cfg = self._cfg
        arr = np.asarray(require(inputs, TEXT_INPUT), dtype=object).reshape(-1)
        if arr.size != 1:
            raise ValueError(f"input {TEXT_INPUT} must hold one prompt, got {arr.size}")
        raw = arr[0]
        if isinstance(raw, (bytes, bytearray)) and len(raw) > cfg.max_prompt_bytes:
            raise ValueError(
                f"input {TEXT_INPUT}: prompt of {len(raw)} bytes is over the limit of {cfg.max_prompt_bytes}"
            )
        prompt = _text(raw, TEXT_INPUT)
        if not prompt:
            raise ValueError(f"input {TEXT_INPUT} is empty: the prompt must hold some text")
        ids = [int(i) for i in self._tok.encode(prompt, add_special_tokens=False).ids]
        if not ids:
            raise ValueError(f"input {TEXT_INPUT}: the prompt {prompt!r} gives no tokens")
        max_tokens = _scalar(inputs, "max_tokens", "iu")
        max_tokens = cfg.max_tokens if max_tokens is None else int(max_tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > cfg.max_tokens_limit:
            raise ValueError(
                f"max_tokens {max_tokens} is over the limit of {cfg.max_tokens_limit} set for this model"
            )
        if self._context is not None and len(ids) + max_tokens > self._context:
            raise ValueError(
                f"the prompt's {len(ids)} tokens plus max_tokens {max_tokens} exceed the model's "
                f"context of {self._context} tokens"
            )
        temperature = _scalar(inputs, "temperature", "fiu")
        temperature = cfg.temperature if temperature is None else float(temperature)
        if not temperature >= 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature must be 0 (greedy) or more, got {temperature}")
        top_p = _scalar(inputs, "top_p", "fiu")
        top_p = cfg.top_p if top_p is None else float(top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        top_k = _scalar(inputs, "top_k", "iu")
        top_k = cfg.top_k if top_k is None else int(top_k)
        if top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or more, got {top_k}")
        seed = _scalar(inputs, "seed", "iu")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be 0 or more, got {seed}")
        stop = cfg.stop
        if "stop" in inputs:
            stop = tuple(_text(v, "stop") for v in np.asarray(inputs["stop"], dtype=object).reshape(-1))
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        return _Request(ids, max_tokens, temperature, top_p, top_k, seed, stop)

    def run(
        self, session: Session, inputs: Mapping[str, np.ndarray], cancel: threading.Event | None = None
    ) -> dict[str, np.ndarray]:
        """The whole answer: `text_output` [1], `token_ids` [n], `finish_reason` [1]."""
        texts: list[bytes] = []
        ids: list[np.ndarray] = []
        finish = np.array([b""], dtype=object)
        for chunk in self.run_stream(session, inputs, cancel):
            texts.append(chunk["text_output"][0])
            ids.append(chunk["token_ids"])
            finish = chunk["finish_reason"]
        return {
            "text_output": np.array([b"".join(texts)], dtype=object),
            "token_ids": np.concatenate(ids).astype(np.int64, copy=False),
            "finish_reason": finish,
        }

    def run_stream(
        self, session: Session, inputs: Mapping[str, np.ndarray], cancel: threading.Event | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Chunks as text becomes final; the last (and only the last) has a finish reason.

        The job is checked before this returns: a bad one raises ValueError here, not on
        the first `next`. Each chunk holds `text_output` [1] (new text, may be empty only
        in the last chunk), `token_ids` [n] (the tokens generated since the previous
        chunk) and `finish_reason` [1] (b"" until the last chunk).
        """
        req = self._request(inputs)
        return self._generate(session, req, cancel)

    def _generate(
        self, session: Session, req: _Request, cancel: threading.Event | None
    ) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(req.seed)
        feed: dict[str, np.ndarray] = {
            c.past: np.zeros((1, c.heads, 0, c.head_dim), c.dtype) for c in self._caches
        }
        new_ids = req.prompt_ids
        done = 0  # tokens already in the cache
        generated: list[int] = []
        pending: list[int] = []  # generated since the last chunk
        released = 0  # characters of the decoded text already sent
        finish = FINISH_LENGTH
        final_text: str | None = None
        for _ in range(req.max_tokens):
            if cancel is not None and cancel.is_set():
                finish = FINISH_CANCELLED
                break
            total = done + len(new_ids)
            feed[IDS_INPUT] = np.asarray([new_ids], dtype=self._ids_dtype)
            if self._mask_dtype is not None:
                feed["attention_mask"] = np.ones((1, total), self._mask_dtype)
            if self._pos_dtype is not None:
                feed["position_ids"] = np.arange(done, total, dtype=self._pos_dtype)[None]
            out = session.infer(feed, self._fetch)
            for c in self._caches:
                feed[c.past] = out[c.present]
            done = total
            token = sample(out[LOGITS_OUTPUT][0, -1], req.temperature, req.top_p, req.top_k, rng)
            generated.append(token)
            pending.append(token)
            new_ids = [token]
            if token in self._eos:
                finish = FINISH_EOS
                break
            text = self._tok.decode(generated, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
            if hits:
                finish, final_text = FINISH_STOP, text[: min(hits)]
                break
            safe = len(text) - _held_back(text, req.stop)
            if safe > released:
                yield _chunk(text[released:safe], pending, "")
                pending, released = [], safe
        if final_text is None:
            final_text = self._tok.decode(generated, skip_special_tokens=True)
        yield _chunk(final_text[released:], pending, finish)


def load_tokenizer(cfg: TextGenSettings, model_dir: Path | None) -> tuple[Any, dict[str, Any]]:
    """The tokenizer and the (generation_)config.json keys of the model's folder."""
    path = _plain_file(model_dir, cfg.tokenizer_file, "tokenizer_file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass for a bad file
        raise ValueError(f"{TASK}: cannot load the tokenizer {path.name}: {exc}") from None
    assert model_dir is not None  # _plain_file refused None
    config = {**_read_json(model_dir / "config.json"), **_read_json(model_dir / "generation_config.json")}
    return tokenizer, config


def build(settings: Mapping[str, Any], model_dir: Path | None, session: Session) -> TextGeneration:
    cfg = parse_settings(TextGenSettings, settings, TASK)
    return TextGeneration(cfg, *load_tokenizer(cfg, model_dir), session)
