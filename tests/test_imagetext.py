"""The image-to-text pipeline on the tiny trained VLM (bench/tinyvlm.py), on ONNX Runtime and
OpenVINO: greedy tokens from PNG digits against the independent numpy model (its training
code's forward, the whole sequence recomputed every step, no cache), captions of held-out
digits, streaming against the whole answer, and the jobs, settings and models refused."""

from __future__ import annotations

import sys
import threading
from typing import Any

import msgspec
import numpy as np
import pytest

from bench.tinyvlm import PROMPTS, TinyVlm, caption
from edgeinfer.contract.manifest import ArtifactFile, ManifestError, ModelSpec, model_roles
from edgeinfer.runtimes.base import LoadOptions, Session, make_sample_inputs
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from edgeinfer.runtimes.pipelines import MULTI_MODEL_TASKS, build_pipeline, pipeline_requirements
from edgeinfer.runtimes.pipelines.imagetext import ImageToText, warmup_inputs
from tests.helpers import blobs, to_png

OPTS = LoadOptions(threads=1)
BACKENDS: list[Any] = [ORT_CPU, OPENVINO]
WHAT, DESCRIBE = PROMPTS
CHECKED = 12  # held-out digits checked token for token per runtime and prompt
SCORED = 120  # held-out digits whose captions are scored
MIN_ACCURACY = 0.9  # measured: 96.7% (348/360 held-out digits, either prompt)


def png(pixels: np.ndarray) -> bytes:
    return to_png(np.rint(pixels.reshape(8, 8) * 255))


def as_png_reads(pixels: np.ndarray) -> np.ndarray:
    """The pixels the pipeline reads back from `png(pixels)` (8-bit, scaled 1/255)."""
    grey: np.ndarray = np.rint(pixels * 255).astype(np.float32)
    return grey / np.float32(255)


def job(image: bytes | None, prompt: str | None, **extra: Any) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    if image is not None:
        inputs["image"] = blobs(image)
    if prompt is not None:
        inputs["text_input"] = np.array([prompt.encode()], dtype=object)
    for key, value in extra.items():
        inputs[key] = np.array([value], dtype=np.int32)
    return inputs


@pytest.fixture(scope="module")
def models(tiny_vlm: TinyVlm) -> dict[str, dict[str, Session]]:
    return {b.name: {role: b.load(tiny_vlm.model_dir / f"{role}.onnx", "CPU", OPTS)
                     for role in ("encoder", "decoder")} for b in BACKENDS}


def pipe(vlm: TinyVlm, sessions: dict[str, Session], **settings: Any) -> ImageToText:
    built = build_pipeline("image-to-text", settings, vlm.model_dir, sessions)
    assert isinstance(built, ImageToText)
    return built


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_greedy_tokens_equal_the_numpy_model(
    tiny_vlm: TinyVlm, models: dict[str, dict[str, Session]], backend: str
) -> None:
    sessions = models[backend]
    p = pipe(tiny_vlm, sessions)
    tok = tiny_vlm.tokenizer()
    for pixels in tiny_vlm.holdout_pixels[:CHECKED]:
        for prompt in PROMPTS:
            want = tiny_vlm.greedy(as_png_reads(pixels), prompt)
            out = p.run(sessions, job(png(pixels), prompt))
            assert out["token_ids"].tolist() == want
            assert want[-1] == tiny_vlm.eos_token_id and bytes(out["finish_reason"][0]) == b"eos"
            assert bytes(out["text_output"][0]).decode() == tok.decode(want)


def test_captions_of_held_out_digits_are_mostly_right(
    tiny_vlm: TinyVlm, models: dict[str, dict[str, Session]]
) -> None:
    sessions = models["onnxruntime"]
    p = pipe(tiny_vlm, sessions)
    right = dict.fromkeys(PROMPTS, 0)
    for pixels, digit in zip(tiny_vlm.holdout_pixels[:SCORED], tiny_vlm.holdout_digits[:SCORED],
                             strict=True):
        for prompt in PROMPTS:
            text = bytes(p.run(sessions, job(png(pixels), prompt))["text_output"][0]).decode()
            right[prompt] += text == caption(prompt, int(digit))
    assert all(n / SCORED >= MIN_ACCURACY for n in right.values()), right
    # the prompt steers the answer: the same image, two kinds of caption
    seven = tiny_vlm.holdout_pixels[list(tiny_vlm.holdout_digits).index(7)]
    assert bytes(p.run(sessions, job(png(seven), WHAT))["text_output"][0]) == b"seven"
    assert bytes(p.run(sessions, job(png(seven), DESCRIBE))["text_output"][0]) == b"a handwritten 7"


def test_stream_chunks_join_to_the_whole_answer(
    tiny_vlm: TinyVlm, models: dict[str, dict[str, Session]]
) -> None:
    sessions = models["onnxruntime"]
    p = pipe(tiny_vlm, sessions)
    inputs = job(png(tiny_vlm.holdout_pixels[0]), DESCRIBE)
    whole = p.run(sessions, inputs)
    chunks = list(p.run_stream(sessions, inputs))
    assert len(chunks) > 2
    assert [bytes(c["finish_reason"][0]) for c in chunks] == [b""] * (len(chunks) - 1) + [b"eos"]
    assert b"".join(bytes(c["text_output"][0]) for c in chunks) == bytes(whole["text_output"][0])
    assert np.concatenate([c["token_ids"] for c in chunks]).tolist() == whole["token_ids"].tolist()
    # text-generation's knobs: a one-token answer, and a cancelled one
    short = p.run(sessions, job(png(tiny_vlm.holdout_pixels[0]), DESCRIBE, max_tokens=1))
    assert short["token_ids"].tolist() == whole["token_ids"].tolist()[:1]
    assert bytes(short["finish_reason"][0]) == b"length"
    cancel = threading.Event()
    cancel.set()
    assert bytes(p.run(sessions, inputs, cancel)["finish_reason"][0]) == b"cancelled"


def test_bad_jobs_are_refused_naming_the_problem(
    tiny_vlm: TinyVlm, models: dict[str, dict[str, Session]]
) -> None:
    sessions = models["onnxruntime"]
    p = pipe(tiny_vlm, sessions)
    good = png(tiny_vlm.holdout_pixels[0])
    cases: list[tuple[dict[str, np.ndarray], str]] = [
        (job(None, WHAT), "missing input 'image'"),
        (job(good, None), "missing input 'text_input'"),
        (job(good[:20], WHAT), r"input image\[0\]: could not decode the PNG image"),
        (job(b"not an image", WHAT), r"input image\[0\]: not a JPEG, PNG, WEBP image"),
        (job(b"", WHAT), r"input image\[0\] is empty"),
        ({**job(good, WHAT), "image": blobs(good, good)}, "input image must hold one image, got 2"),
        (job(good, ""), "input text_input is empty"),
        (job(good, WHAT, max_tokens=60), r"exceed the model's context of 44 tokens"),  # 48 - 4 image
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            p.run_stream(sessions, inputs)  # refused before the stream starts
    with pytest.raises(ValueError, match="image-to-text runs several models: give a mapping"):
        p.run(sessions["encoder"], job(good, WHAT))


def test_any_image_size_and_colour_is_fitted_to_the_encoder(
    tiny_vlm: TinyVlm, models: dict[str, dict[str, Session]]
) -> None:
    sessions = models["onnxruntime"]
    p = pipe(tiny_vlm, sessions, image={"interpolation": "nearest"})
    pixels = tiny_vlm.holdout_pixels[3]
    big = np.repeat(np.repeat(np.rint(pixels.reshape(8, 8) * 255), 4, 0), 4, 1)
    rgb = to_png(np.stack([big] * 3, axis=-1), "RGB")  # 32x32 colour: grey and 8x8 by the pipeline
    assert p.run(sessions, job(rgb, WHAT))["token_ids"].tolist() == tiny_vlm.greedy(
        as_png_reads(pixels), WHAT)


def test_settings_and_models_that_do_not_fit_are_refused(
    tiny_vlm: TinyVlm, models: dict[str, dict[str, Session]]
) -> None:
    sessions = models["onnxruntime"]
    enc, dec = sessions["encoder"], sessions["decoder"]
    with pytest.raises(ValueError, match=r"settings image \(the encoder's input\): .*colour RGB gives 3"):
        pipe(tiny_vlm, sessions, image={"color": "RGB"})
    with pytest.raises(ValueError, match=r"key 'imgae': unknown key"):
        pipe(tiny_vlm, sessions, imgae={})
    with pytest.raises(ValueError, match=r"missing model\(s\) decoder, unknown role\(s\) text"):
        build_pipeline("image-to-text", {}, tiny_vlm.model_dir, {"encoder": enc, "text": dec})
    with pytest.raises(ValueError, match="the decoder has no input 'pixels'"):
        pipe(tiny_vlm, sessions, prefix_input="pixels")
    with pytest.raises(ValueError, match=r"the encoder's input\): .* the model has 6 inputs"):
        build_pipeline("image-to-text", {}, tiny_vlm.model_dir, {"encoder": dec, "decoder": dec})
    with pytest.raises(ValueError, match="a context of 4 positions leaves none for text"):
        pipe(tiny_vlm, sessions, context_length=4)
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        pipe(tiny_vlm, sessions, tokenizer_file="config.json")


def test_roles_requirements_and_warmup(
    tiny_vlm: TinyVlm, models: dict[str, dict[str, Session]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MULTI_MODEL_TASKS["image-to-text"] == (("encoder", "decoder"), ())
    # the version: the encoder is the entry's artifact, the decoder a file beside it
    spec = msgspec.convert({"name": "vlm", "version": "1", "task": "image-to-text", "uri": "file:///e",
                            "sha256": "a" * 64, "size": 1}, ModelSpec)
    with pytest.raises(ManifestError, match=r"missing decoder\.onnx in files"):
        model_roles(spec)
    spec = msgspec.structs.replace(spec, files=[ArtifactFile("decoder.onnx", "file:///d", "b" * 64, 2)])
    assert [(r.role, r.file) for r in model_roles(spec) or []] == [("encoder", "model.onnx"),
                                                                   ("decoder", "decoder.onnx")]
    for backend in models.values():
        for role, session in backend.items():
            # no inputs of the task's own: the agent's synthetic warm-up inputs run
            assert warmup_inputs(role) == {}
            out = session.infer(make_sample_inputs(session.inputs))
            assert all(np.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError, match="no role 'det'"):
        warmup_inputs("det")
    assert pipeline_requirements()["image-to-text"] is None
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert (pipeline_requirements()["image-to-text"] or "").startswith("pillow unavailable")
    assert pipeline_requirements()["text-generation"] is None  # only the image task needs pillow
