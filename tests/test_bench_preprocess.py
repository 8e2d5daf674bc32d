"""bench/preprocess.py: the per-job pre-/post-processing part of `python -m bench` runs alone
(`--only preprocess`), adds up to its job and lands in latest.json and latest.md. No timing is
judged here: the machine may be busy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import preprocess
from bench.__main__ import main as bench_main

pytest.importorskip("tokenizers", reason="pip install 'edgeinfer[media]'")
TINY = preprocess.Budget(0.02, 2, 3)


def test_cases_split_each_job_into_model_calls_and_the_rest(tmp_path: Path) -> None:
    said: list[str] = []
    res = preprocess.run(tmp_path, TINY, said.append, ["image-classification", "embedding"])
    assert res["skipped"] == {}
    cases = {(c["pipeline"], c["case"]): c for c in res["cases"]}
    assert [k[0] for k in cases] == ["image-classification"] * 2 + ["embedding"] * 2
    for c in cases.values():
        assert c["runs"] >= TINY.min_iters and c["model_calls_per_job"] == 1
        assert c["runtime_in_job_p50_ms"] > 0 and c["raw_p50_ms"] > 0
        assert 0 <= c["pre_post_share"] < 1
        assert all(v is not None and v > 0 for v in c["steps_p50_ms"].values()), c
    jpeg = cases[("image-classification", "JPEG 640x480 -> 224x224")]
    assert set(jpeg["steps_p50_ms"]) == {"decode + resize + normalise"}
    assert len(said) == 4
    md = "\n".join(preprocess.markdown_section({"preprocess": res}))
    assert "## Pre- and post-processing per job" in md and "| embedding | 8 texts" in md


def test_a_pipeline_that_cannot_run_is_reported_not_fatal(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(work: Path) -> list[preprocess.Case]:
        raise RuntimeError("the rapidocr-onnxruntime wheel is not installed")

    monkeypatch.setitem(preprocess.BUILDERS, "ocr", broken)
    res = preprocess.run(tmp_path, TINY, lambda _: None, ["ocr"])
    assert res["cases"] == []
    assert res["skipped"] == {"ocr": "RuntimeError: the rapidocr-onnxruntime wheel is not installed"}
    assert "**ocr** not measured" in "\n".join(preprocess.markdown_section({"preprocess": res}))


def test_only_preprocess_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert bench_main(["--only", "preprocess", "--pipelines", "embedding", "--quick",
                       "--out", str(out)]) == 0
    results = json.loads((out / "latest.json").read_text())
    assert results["raw"] == {} and results["e2e"] == {} and results["models"] == {}
    assert [c["pipeline"] for c in results["preprocess"]["cases"]] == ["embedding", "embedding"]
    md = (out / "latest.md").read_text()
    assert "## Pre- and post-processing per job (task pipelines)" in md
    assert "preprocess.png" in results["plots"] and (out / "preprocess.png").is_file()
