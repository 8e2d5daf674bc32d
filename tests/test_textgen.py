"""The text-generation pipeline on the tiny trained LM (bench/tinylm.py), on ONNX Runtime
and OpenVINO: greedy tokens against an independent numpy forward pass that recomputes the
whole prefix each step (no cache), streaming against the whole answer, seeded sampling,
stop strings, EOS, cancellation, and the jobs that are refused."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import build_mlp
from bench.tinylm import EOS, TinyLm, TinyLmConfig, build_tiny_lm
from edgeinfer.runtimes.base import LoadOptions, Session
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import build_pipeline, pipeline_requirements
from edgeinfer.runtimes.pipelines.textgen import (
    Cancellations,
    TextGeneration,
    _held_back,
    _present_name,
    sample,
)

OPTS = LoadOptions(threads=1)
BACKENDS: list[Any] = [ORT_CPU, OPENVINO]
PROMPTS = ["Four score and", "It was the best", "Call me", "The quick brown fox"]


@pytest.fixture(scope="module")
def lm(tiny_lm: TinyLm) -> TinyLm:
    return tiny_lm


@pytest.fixture(scope="module")
def sessions(lm: TinyLm) -> dict[str, Session]:
    return {b.name: b.load(lm.path, "CPU", OPTS) for b in BACKENDS}


def _pipe(lm: TinyLm, session: Session, **settings: Any) -> TextGeneration:
    pipe = build_pipeline("text-generation", settings, lm.model_dir, session)
    assert isinstance(pipe, TextGeneration)
    return pipe


def _job(prompt: str | bytes, **extra: Any) -> dict[str, np.ndarray]:
    data = prompt.encode() if isinstance(prompt, str) else prompt
    job = {"text_input": np.array([data], dtype=object)}
    kinds = {
        "max_tokens": np.int32,
        "temperature": np.float32,
        "top_p": np.float32,
        "top_k": np.int32,
        "seed": np.uint64,
    }
    for key, value in extra.items():
        if key == "stop":
            job[key] = np.array([s.encode() for s in value], dtype=object)
        else:
            job[key] = np.array([value], kinds[key])
    return job


# --- an independent numpy model: no cache, the whole prefix every step ---------------------


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> Any:
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    return (x64 - mu) / np.sqrt(var + 1e-5) * g + b


def _numpy_logits(w: dict[str, np.ndarray], cfg: TinyLmConfig, ids: list[int]) -> np.ndarray:
    """Logits of the last position, in float64, one head at a time, with a -inf causal mask."""
    t, hd = len(ids), cfg.dim // cfg.heads
    x = w["tok"][ids].astype(np.float64) + w["pos"][:t]
    for i in range(cfg.layers):
        p = f"l{i}."
        h = _layer_norm(x, w[p + "ln1_g"], w[p + "ln1_b"])
        q, k, v = h @ w[p + "wq"], h @ w[p + "wk"], h @ w[p + "wv"]
        heads = []
        for j in range(cfg.heads):
            cols = slice(j * hd, (j + 1) * hd)
            scores = q[:, cols] @ k[:, cols].T / np.sqrt(hd)
            scores[np.triu_indices(t, 1)] = -np.inf
            e = np.exp(scores - scores.max(1, keepdims=True))
            heads.append((e / e.sum(1, keepdims=True)) @ v[:, cols])
        x = x + np.concatenate(heads, axis=1) @ w[p + "wo"]
        h2 = _layer_norm(x, w[p + "ln2_g"], w[p + "ln2_b"])
        x = x + np.maximum(h2 @ w[p + "w1"] + w[p + "b1"], 0) @ w[p + "w2"] + w[p + "b2"]
    out: np.ndarray = _layer_norm(x, w["lnf_g"], w["lnf_b"])[-1] @ w["head"]
    return out


def _numpy_greedy(lm: TinyLm, prompt_ids: list[int], max_tokens: int) -> list[int]:
    ids, out = list(prompt_ids), []
    for _ in range(max_tokens):
        token = int(np.argmax(_numpy_logits(lm.weights, lm.config, ids)))
        out.append(token)
        ids.append(token)
        if token == lm.eos_token_id:
            break
    return out


def _tokenizer(lm: TinyLm) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(lm.model_dir / "tokenizer.json"))


# --- correctness -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_greedy_tokens_match_numpy_without_cache(
    lm: TinyLm, sessions: dict[str, Session], backend: Any
) -> None:
    session = sessions[backend.name]
    pipe = _pipe(lm, session)
    tok = _tokenizer(lm)
    for prompt in PROMPTS:
        answer = pipe.run(session, _job(prompt, max_tokens=60))
        expected = _numpy_greedy(lm, tok.encode(prompt).ids, 60)
        assert answer["token_ids"].tolist() == expected, prompt
        assert answer["text_output"][0].decode() == tok.decode(expected, skip_special_tokens=True)


def test_the_model_recites_its_text(lm: TinyLm, sessions: dict[str, Session]) -> None:
    session = sessions["onnxruntime"]
    answer = _pipe(lm, session).run(session, _job("Four score and", max_tokens=100))
    text = answer["text_output"][0].decode()
    assert text.startswith(" seven years ago our fathers brought forth on this continent")
    assert answer["finish_reason"][0] == b"eos"
    assert answer["token_ids"][-1] == lm.eos_token_id
    assert EOS not in text


def test_onnxruntime_and_openvino_give_the_same_greedy_tokens(
    lm: TinyLm, sessions: dict[str, Session]
) -> None:
    answers = {
        name: [_pipe(lm, s).run(s, _job(p, max_tokens=90))["token_ids"].tolist() for p in PROMPTS]
        for name, s in sessions.items()
    }
    assert answers["onnxruntime"] == answers["openvino"]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("extra", [{}, {"temperature": 0.9, "seed": 7}, {"stop": ["worst"]}])
def test_stream_equals_the_whole_answer(
    lm: TinyLm, sessions: dict[str, Session], backend: Any, extra: dict[str, Any]
) -> None:
    session = sessions[backend.name]
    pipe = _pipe(lm, session)
    job = _job("It was the best", max_tokens=40, **extra)
    whole = pipe.run(session, job)
    chunks = list(pipe.run_stream(session, job))
    assert len(chunks) > 3
    assert all(c["finish_reason"][0] == b"" for c in chunks[:-1])
    assert chunks[-1]["finish_reason"][0] == whole["finish_reason"][0] != b""
    assert all(c["text_output"][0] for c in chunks[:-1])  # only the last may be empty
    assert b"".join(c["text_output"][0] for c in chunks) == whole["text_output"][0]
    assert np.concatenate([c["token_ids"] for c in chunks]).tolist() == whole["token_ids"].tolist()


def test_max_tokens_ends_with_length(lm: TinyLm, sessions: dict[str, Session]) -> None:
    session = sessions["onnxruntime"]
    answer = _pipe(lm, session).run(session, _job("It was the best", max_tokens=5))
    assert answer["token_ids"].shape == (5,)
    assert answer["finish_reason"][0] == b"length"


def test_stop_string_cuts_the_text_before_it(lm: TinyLm, sessions: dict[str, Session]) -> None:
    session = sessions["onnxruntime"]
    pipe = _pipe(lm, session)
    free = pipe.run(session, _job("It was the best", max_tokens=30))["text_output"][0].decode()
    assert "worst" in free
    answer = pipe.run(session, _job("It was the best", max_tokens=30, stop=["nothing", "worst"]))
    assert answer["finish_reason"][0] == b"stop"
    assert answer["text_output"][0].decode() == free[: free.index("worst")]
    # A stop string from the settings, when the job sends none.
    by_default = _pipe(lm, session, stop=["worst"]).run(session, _job("It was the best", max_tokens=30))
    assert by_default["text_output"][0] == answer["text_output"][0]
    # Streaming never lets out the start of a stop string that then completes.
    chunks = list(pipe.run_stream(session, _job("It was the best", max_tokens=30, stop=["worst"])))
    assert not any(c["text_output"][0].endswith(b"wor") for c in chunks)


def test_same_seed_same_sample_other_seeds_differ(lm: TinyLm, sessions: dict[str, Session]) -> None:
    session = sessions["onnxruntime"]
    pipe = _pipe(lm, session)

    def draw(seed: int, **kw: Any) -> list[int]:
        job = _job("It was the", max_tokens=40, temperature=1.5, seed=seed, **kw)
        return list(pipe.run(session, job)["token_ids"].tolist())

    first = draw(1)
    assert draw(1) == first
    assert draw(1, top_p=0.9) == draw(1, top_p=0.9)
    assert draw(2) != first
    assert draw(3) != first
    # Also with OpenVINO: the same logits to within float error, hence the same draws.
    ov = sessions["openvino"]
    assert (
        _pipe(lm, ov)
        .run(ov, _job("It was the", max_tokens=40, temperature=1.5, seed=1))["token_ids"]
        .tolist()
        == first
    )


def test_sample_filters() -> None:
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert sample(logits, 0.0, 1.0, 0, rng) == 0
    assert {sample(logits, 1.0, 1.0, 1, rng) for _ in range(50)} == {0}  # top-k 1 is greedy
    assert {sample(logits, 1.0, 0.6, 0, rng) for _ in range(200)} == {0, 1}  # nucleus 0.5+0.3
    counts = np.bincount([sample(logits, 1.0, 1.0, 0, rng) for _ in range(4000)], minlength=4)
    assert np.allclose(counts / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_held_back_text() -> None:
    assert _held_back("it was the wor", ("worst",)) == 3
    assert _held_back("it was the", ("worst",)) == 0
    assert _held_back("caf\ufffd", ()) == 1
    assert _present_name("past_key_values.3.key") == "present.3.key"
    assert _present_name("past_value_1") == "present_value_1"


# --- cancellation ------------------------------------------------------------------------


def test_cancel_by_job_id(lm: TinyLm, sessions: dict[str, Session]) -> None:
    session = sessions["onnxruntime"]
    pipe = _pipe(lm, session)
    jobs = Cancellations()
    event = jobs.register("job-1")
    chunks = []
    for chunk in pipe.run_stream(session, _job("Alice was", max_tokens=60), cancel=event):
        chunks.append(chunk)
        if len(chunks) == 3:
            assert jobs.cancel("job-1")
    assert chunks[-1]["finish_reason"][0] == b"cancelled"
    assert sum(len(c["token_ids"]) for c in chunks) < 10
    jobs.release("job-1")
    assert not jobs.cancel("job-1")
    # Cancelled before it starts: no model call, an empty answer.
    done = threading.Event()
    done.set()
    answer = pipe.run(session, _job("Alice was", max_tokens=60), cancel=done)
    assert answer["finish_reason"][0] == b"cancelled"
    assert answer["token_ids"].shape == (0,)
    # The pipeline keeps no state: the next job runs whole.
    assert pipe.run(session, _job("Alice was", max_tokens=8))["token_ids"].shape == (8,)


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        (_job(""), "empty"),
        (_job("Alice", max_tokens=51), "over the limit of 50"),
        (_job("Alice", max_tokens=0), "at least 1"),
        (_job("Alice", temperature=-1.0), "temperature"),
        (_job("Alice", top_p=0.0), "top_p"),
        (_job(b"\xff\xfe"), "not UTF-8"),
        (_job("Alice", stop=[""]), "stop strings"),
        ({"text_input": np.array([b"a", b"b"], dtype=object)}, "one prompt"),
        ({}, "missing input 'text_input'"),
    ],
)
def test_bad_jobs_are_refused_before_any_model_call(
    lm: TinyLm, sessions: dict[str, Session], job: dict[str, np.ndarray], reason: str
) -> None:
    session = sessions["onnxruntime"]
    pipe = _pipe(lm, session, max_tokens=10, max_tokens_limit=50)
    with pytest.raises(ValueError, match=reason):
        pipe.run_stream(session, job)  # refused on the call, not on the first chunk
    with pytest.raises(ValueError, match=reason):
        pipe.run(session, job)


def test_prompt_plus_max_tokens_over_the_context(lm: TinyLm, sessions: dict[str, Session]) -> None:
    session = sessions["onnxruntime"]
    pipe = _pipe(lm, session)
    assert pipe.context_length == lm.config.context  # from config.json
    n = len(_tokenizer(lm).encode("Call me").ids)
    with pytest.raises(ValueError, match=rf"prompt's {n} tokens .* exceed the model's context of 128 tokens"):
        pipe.run(session, _job("Call me", max_tokens=129 - n))
    assert pipe.run(session, _job("Call me", max_tokens=128 - n))["token_ids"].size > 0


def test_models_and_folders_that_do_not_fit(lm: TinyLm, sessions: dict[str, Session], tmp_path: Path) -> None:
    session = sessions["onnxruntime"]
    with pytest.raises(ValueError, match="model's folder"):
        build_pipeline("text-generation", {}, None, session)
    with pytest.raises(ValueError, match="tokenizer"):
        build_pipeline("text-generation", {}, tmp_path, session)
    with pytest.raises(ValueError, match="plain file name"):
        build_pipeline("text-generation", {"tokenizer_file": "../tokenizer.json"}, lm.model_dir, session)
    with pytest.raises(ValueError, match="over max_tokens_limit"):
        build_pipeline("text-generation", {"max_tokens_limit": 10}, lm.model_dir, session)
    with pytest.raises(ValueError, match="known keys"):
        build_pipeline("text-generation", {"temprature": 1}, lm.model_dir, session)
    mlp = ORT_CPU.load(build_mlp(tmp_path), "CPU", OPTS)
    with pytest.raises(ValueError, match="no input input_ids"):
        build_pipeline("text-generation", {}, lm.model_dir, mlp)
    assert pipeline_requirements()["text-generation"] is None


def test_the_build_is_deterministic(tmp_path: Path) -> None:
    cfg = TinyLmConfig(steps=5)
    a, b = build_tiny_lm(tmp_path / "a", cfg), build_tiny_lm(tmp_path / "b", cfg)
    for name in ("model.onnx", "tokenizer.json"):
        assert (a.model_dir / name).read_bytes() == (b.model_dir / name).read_bytes(), name
    again = build_tiny_lm(tmp_path / "a", cfg)  # cached: not retrained
    assert again.final_loss == a.final_loss
