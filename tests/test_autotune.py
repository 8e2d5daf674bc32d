"""Runtime auto-tuning and live failover, with real runtimes on real models.

Only the test hook EDGE_AGENT_TEST_FAIL_RUNTIME (agent/faults.py) fakes anything: it makes a
real runtime's serving session start raising, as a runtime that breaks under load would.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import build_cnn, build_digits, build_mlp
from edgeinfer.agent.config import ConfigError, load_config
from edgeinfer.agent.failover import RunWatch
from edgeinfer.agent.faults import FAIL_RUNTIME_ENV, failing_runtime_from_env
from edgeinfer.contract.topics import Topics
from edgeinfer.runtimes.autotune import (
    Choice,
    Tolerance,
    Tuned,
    autotune,
    candidate_choices,
    choose,
    has_bf16,
)
from edgeinfer.runtimes.autotune_cache import AutotuneCache
from edgeinfer.runtimes.base import LoadOptions
from edgeinfer.runtimes.hardware import HardwareInfo, detect
from edgeinfer.runtimes.selection import check_preference, explain, is_auto, plan
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import PREFIX, Replies, Watch, deploy, job_body, reported, wait_state

OPTS = LoadOptions()
BUDGET_S = 10.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"mlp": build_mlp(d), "cnn": build_cnn(d), "digits": build_digits(d).path}


@pytest.fixture(scope="module")
def hw() -> HardwareInfo:
    return replace(detect(), nvidia_gpus=())  # CUDA is a candidate only where it is real


def tune(path: Path, hw: HardwareInfo, **kw: Any) -> Tuned:
    return autotune(path, hw, OPTS, sha256="0" * 64, budget_s=BUDGET_S, **kw)


def by_label(tuned: Tuned) -> dict[str, Any]:
    return {f"{r.runtime}/{r.device}/{r.precision}": r for r in tuned.candidates}


# --- choosing ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_auto_serves_the_fastest_agreeing_candidate(
    models: dict[str, Path], hw: HardwareInfo, model: str
) -> None:
    tuned = tune(models[model], hw)
    try:
        reports = by_label(tuned)
        choices, _ = candidate_choices(hw)
        # Every candidate is reported: ORT CPU, OpenVINO's devices, bf16 where the CPU has it.
        assert {c.label for c in choices} <= set(reports)
        assert ("openvino/CPU/bf16" in reports) == has_bf16(hw)
        assert ("openvino/CPU/bf16" in reports) == any(
            f in hw.cpu_flags for f in ("avx512_bf16", "amx_bf16"))
        agreeing = [r for r in reports.values() if r.agrees and r.p50_ms is not None]
        assert agreeing, reports
        best = min(r.p50_ms for r in agreeing)
        chosen = reports[tuned.choice.label]
        assert chosen.agrees and chosen.p50_ms is not None
        assert chosen.p50_ms <= best * 1.10, reports  # within 10% of the best, same run
        assert tuned.session.runtime == tuned.choice.runtime
        assert tuned.reference == "onnxruntime/CPU/f32"
        assert tuned.tuned and not tuned.cached and tuned.tuning_s is not None
        assert tuned.tuning_s < BUDGET_S + 5
        # Failover order: the other agreeing candidates, fastest first.
        assert [c.label for c in tuned.fallbacks] == [
            f"{r.runtime}/{r.device}/{r.precision}"
            for r in sorted(agreeing, key=lambda r: r.p50_ms) if r is not chosen]
        assert tuned.attempts[-1].ok and tuned.attempts[-1].runtime == tuned.choice.runtime
        print(f"\n{model}: auto chose {tuned.choice.label} in {tuned.tuning_s}s; "
              + ", ".join(f"{k} p50={r.p50_ms}ms agrees={r.agrees}" for k, r in reports.items()))
    finally:
        tuned.session.close()


def test_auto_lands_digits_on_onnxruntime_with_the_reason(
    models: dict[str, Path], hw: HardwareInfo
) -> None:
    tuned = tune(models["digits"], hw)
    tuned.session.close()
    assert tuned.choice == Choice("onnxruntime", "CPU")
    reports = by_label(tuned)
    ov = reports["openvino/CPU/f32"]
    assert not ov.ok and "ai.onnx.ml" in ov.reason and ov.p50_ms is None
    assert reports["onnxruntime/CPU/f32"].p50_ms is not None
    failed = [a for a in tuned.attempts if not a.ok and a.runtime == "openvino"]
    assert failed and "ai.onnx.ml" in failed[0].reason
    assert tuned.fallbacks == []


@pytest.mark.skipif(not has_bf16(detect()), reason="the CPU has no AVX512-BF16 / AMX-BF16")
def test_a_disagreeing_candidate_is_rejected(models: dict[str, Path], hw: HardwareInfo) -> None:
    # bf16 agrees within its default tolerance, and not at all with a tolerance of 0.
    loose = tune(models["cnn"], hw)
    loose.session.close()
    assert by_label(loose)["openvino/CPU/bf16"].agrees is True
    strict = tune(models["cnn"], hw, tolerance=Tolerance(rtol=0.0, atol=0.0))
    strict.session.close()
    bf16 = by_label(strict)["openvino/CPU/bf16"]
    assert bf16.ok and bf16.agrees is False and bf16.p50_ms is None
    assert "disagrees with the reference onnxruntime/CPU/f32" in bf16.reason
    assert "rtol=0, atol=0" in bf16.reason
    assert strict.choice.precision == "f32"
    assert all(c.precision == "f32" for c in strict.fallbacks)
    assert any(not a.ok and a.reason.startswith("bf16: disagrees") for a in strict.attempts)


def test_the_choice_is_cached(models: dict[str, Path], hw: HardwareInfo, tmp_path: Path) -> None:
    cache = AutotuneCache(tmp_path / "autotune.json")
    first = tune(models["mlp"], hw, cache=cache)
    first.session.close()
    second = tune(models["mlp"], hw, cache=cache)
    second.session.close()
    assert not first.cached and second.cached
    assert second.choice == first.choice and second.tuning_s == first.tuning_s
    assert [r.to_json() for r in second.candidates] == [r.to_json() for r in first.candidates]
    assert second.fallbacks == first.fallbacks
    # Another model, another tolerance or other hardware tunes again.
    other = autotune(models["mlp"], hw, OPTS, sha256="1" * 64, budget_s=BUDGET_S, cache=cache)
    other.session.close()
    assert not other.cached
    stricter = tune(models["mlp"], hw, cache=cache, tolerance=Tolerance(1e-4, 1e-6))
    stricter.session.close()
    assert not stricter.cached
    moved = tune(models["mlp"], replace(hw, cpu_model="another CPU"), cache=cache)
    moved.session.close()
    assert not moved.cached
    doc = json.loads((tmp_path / "autotune.json").read_text())
    assert len(doc["entries"]) == 4


def test_a_pinned_list_skips_tuning(models: dict[str, Path], hw: HardwareInfo) -> None:
    tuned = choose(models["mlp"], ["openvino", "onnxruntime"], hw, OPTS, sha256="0" * 64,
                   budget_s=BUDGET_S)
    tuned.session.close()
    assert tuned.choice == Choice("openvino", "CPU") and not tuned.tuned
    assert tuned.candidates == [] and tuned.summary() is None
    assert tuned.fallbacks == [Choice("onnxruntime", "CPU")]


def test_auto_preference_is_checked(hw: HardwareInfo, tmp_path: Path) -> None:
    assert is_auto(["auto"]) and is_auto([" AUTO "]) and not is_auto(None)
    assert not is_auto(["openvino"])
    with pytest.raises(ValueError, match="stands alone"):
        is_auto(["auto", "openvino"])
    check_preference(["auto"])
    with pytest.raises(ValueError, match="stands alone"):
        check_preference(["openvino", "auto"])
    assert plan(["auto"], hw) == plan(None, hw)
    assert any("auto: loads, checks" in line for line in explain(["auto"], hw))
    assert load_config(None, {}).runtime.prefer == ["auto"]
    bad = tmp_path / "agent.yaml"
    bad.write_text("runtime:\n  prefer: [auto, cuda]\n")
    with pytest.raises(ConfigError, match=r"runtime\.prefer"):
        load_config(bad, {})


# --- failover, in process ----------------------------------------------------------------


def test_nan_from_finite_inputs_counts_as_a_failed_run() -> None:
    fired: list[str] = []
    watch = RunWatch(2, [], fired.append)
    x = {"x": np.ones((1, 2), np.float32)}
    good = {"y": np.ones((1, 2), np.float32)}
    bad = {"y": np.array([[np.nan, 1.0]], np.float32)}
    watch.returned([x], [bad])
    watch.returned([x], [good])  # a good run resets the count
    watch.returned([x], [bad])
    watch.returned([{"x": np.full((1, 2), np.nan, np.float32)}], [bad])  # NaN in: not counted
    assert fired == [] and watch.consecutive == 1
    watch.returned([x], [bad])
    assert len(fired) == 1 and "NaN or Inf" in fired[0]
    watch.returned([x], [bad])
    assert len(fired) == 1  # fires once


def test_fail_runtime_hook_parses() -> None:
    assert failing_runtime_from_env({}) is None
    assert failing_runtime_from_env({FAIL_RUNTIME_ENV: "openvino@4"}) == ("openvino", 4)
    for bad in ("openvino", "openvino@0", "@3", "openvino@x"):
        with pytest.raises(ValueError):
            failing_runtime_from_env({FAIL_RUNTIME_ENV: bad})


# --- through a real broker and agent process ---------------------------------------------


def model_status(rep: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in rep["models"] if m["name"] == name)


def test_agent_tunes_by_default_and_a_restart_uses_the_cache(
    broker: Broker, models: dict[str, Path], tmp_path: Path
) -> None:
    device = "gw-autotune"
    agent = AgentProcess(tmp_path / "agent", broker.url, device)
    agent.start()
    try:
        wait_state(broker.url, "online", device)
        assert deploy(broker.url, tmp_path, "--model", "mlp", "--version", "1",
                      "--file", str(models["mlp"]), "--wait", "60", device=device) == 0
        status = model_status(reported(broker.url, device), "mlp")
        assert status["state"] == "serving"
        assert status["autotune"]["cached"] is False and status["autotune"]["tuning_s"] > 0
        labels = {f"{c['runtime']}/{c['device']}/{c['precision']}" for c in status["candidates"]}
        assert {"onnxruntime/CPU/f32", "openvino/CPU/f32"} <= labels
        assert ("openvino/CPU/bf16" in labels) == has_bf16(detect())
        assert set(status["candidates"][0]) >= {"runtime", "device", "precision", "ok", "reason",
                                                "p50_ms", "agrees"}
        assert status["attempts"][-1]["ok"]
        assert (agent.state_dir / "autotune.json").is_file()
        agent.stop()
        agent.start()
        agent.wait_log("autotune cache hit")
        wait_state(broker.url, "online", device)
        again = model_status(reported(broker.url, device), "mlp")
        assert again["autotune"]["cached"] is True
        assert (again["runtime"], again["device"], again["precision"]) == (
            status["runtime"], status["device"], status["precision"])
        assert again["candidates"] == status["candidates"]
    finally:
        agent.stop()


def test_a_failing_runtime_fails_over_without_losing_a_job(
    broker: Broker, models: dict[str, Path], tmp_path: Path
) -> None:
    device = "gw-failover"
    topics = Topics(PREFIX, device)
    agent = AgentProcess(tmp_path / "agent", broker.url, device,
                         runtime={"failover_after": 3})
    events = Watch(broker.url, topics.events)
    replies = Replies(broker.url)
    # OpenVINO's 4th job inference and every one after it raise.
    agent.start({FAIL_RUNTIME_ENV: "openvino@4"})
    try:
        wait_state(broker.url, "online", device)
        assert deploy(broker.url, tmp_path, "--model", "mlp", "--version", "1",
                      "--file", str(models["mlp"]), "--prefer", "openvino,onnxruntime",
                      "--wait", "60", device=device) == 0
        assert model_status(reported(broker.url, device), "mlp")["runtime"] == "openvino"
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        n = 30
        for i in range(n):  # one at a time: the failing runs are consecutive
            replies.send(topics.jobs, job_body(f"j{i}", "mlp", {"x": x}), f"c{i}".encode())
            replies.wait_count(i + 1)
        switched = events.wait_for(lambda e: e["type"] == "runtime_failover", timeout=30)
        assert switched["from_runtime"] == "openvino" and switched["runtime"] == "onnxruntime"
        assert "3 consecutive failed runs" in switched["reason"]
        assert "TEST HOOK" in switched["reason"]
        # More jobs, all at once: every one answered by the new runtime.
        for i in range(n, n + 20):
            replies.send(topics.jobs, job_body(f"j{i}", "mlp", {"x": x}), f"c{i}".encode())
        replies.wait_count(n + 20)
        time.sleep(0.5)  # nothing more may arrive
        answers = replies.by_correlation()
        assert sorted(answers) == sorted(f"c{i}".encode() for i in range(n + 20))
        assert all(len(a) == 1 for a in answers.values()), "a job answered twice"
        runtimes = [answers[f"c{i}".encode()][0].get("parameters", {}).get("runtime")
                    for i in range(n + 20)]
        codes = [answers[f"c{i}".encode()][0].get("parameters", {}).get("code")
                 for i in range(n + 20)]
        assert runtimes[:3] == ["openvino"] * 3
        failed = [i for i, c in enumerate(codes) if c is not None]
        assert failed and {codes[i] for i in failed} == {"INTERNAL"}
        assert failed == list(range(3, 3 + len(failed)))  # 4th job on, until the swap
        assert all(r == "onnxruntime" for r in runtimes[failed[-1] + 1:])
        y = answers[f"c{n + 19}".encode()][0]["outputs"][0]["data"]
        assert np.isfinite(y).all() and abs(sum(y) - 1.0) < 1e-4  # softmax
        status = model_status(reported(broker.url, device), "mlp")
        assert status["runtime"] == "onnxruntime" and status["state"] == "serving"
        assert len(status["failovers"]) == 1
        assert status["failovers"][0]["from"] == "openvino/CPU"
        assert status["failovers"][0]["to"] == "onnxruntime/CPU"
    finally:
        agent.stop()
        events.close()
        replies.close()
