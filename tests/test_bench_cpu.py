"""bench/jobcpu.py's sums and their place in the report, from made-up figures (no timing is
judged here: the machine may be busy); the codec echo itself is tested through a broker in
tests/test_bench_codec_echo.py."""

from __future__ import annotations

from typing import Any

from bench import jobcpu, report


def _point(cpu_ms: float, errors: int = 0) -> dict[str, Any]:
    return {"concurrency": 32, "throughput": 1000.0, "p50_ms": 30.0, "completed": 2000,
            "errors": errors, "target_cpu_ms_per_job": cpu_ms, "broker_cpu_ms_per_job": 0.05,
            "client_cpu_ms_per_job": 0.3, "other_cpu_share": 0.0}


def _cpu_part() -> dict[str, Any]:
    part: dict[str, Any] = {"level": 32, "jobs": {
        "tiny": {"title": "digits", "request_bytes": 441, "answer_bytes": 396,
                 "deploy": {"runtime": "onnxruntime", "device": "CPU"},
                 "runtime_cpu": {"cpu_ms_per_call": 0.01, "calls": 100},
                 "points": {"agent": _point(0.25), "paho_echo": _point(0.2),
                            "codec_echo": _point(0.05)}},
        "tensor": {"title": "ReduceMean", "request_bytes": 600_197, "answer_bytes": 259,
                   "deploy": {"runtime": "onnxruntime", "device": "CPU"},
                   "runtime_cpu": {"cpu_ms_per_call": 0.05, "calls": 100},
                   "points": {"agent": _point(1.05), "paho_echo": _point(2.0),
                              "codec_echo": _point(0.25, errors=3)}}}}
    part["summary"] = jobcpu.summary(part)
    return part


def test_summary_sets_the_agent_beside_each_echo_and_takes_the_runtime_off() -> None:
    s = jobcpu.summary(_cpu_part())
    assert s["tiny"]["agent_vs_paho_echo"] == 1.25 and s["tiny"]["agent_vs_codec_echo"] == 5.0
    assert s["tensor"]["agent_beyond_runtime_ms"] == 1.0
    assert s["tensor"]["agent_beyond_runtime_vs_paho_echo"] == 0.5
    # A point with errors gives no CPU per job: its answers were not all answers.
    assert s["tensor"]["codec_echo_cpu_ms"] is None and s["tensor"]["agent_vs_codec_echo"] is None


def test_issue_11_cpu_targets_are_judged_and_the_section_is_written() -> None:
    results = {"meta": {}, "cpu": _cpu_part()}
    by_key = {r.key: r for r in report.ratios(results)}
    assert by_key["cpu_tiny_ms"].ok is True  # 0.25 <= 0.30
    assert by_key["cpu_tiny_vs_echo"].ok is True  # 1.25 <= 1.6
    assert by_key["cpu_600k_ms"].ok is False  # 1.0 > 0.60
    assert by_key["cpu_600k_vs_echo"].ok is False  # 0.5 > 0.3
    assert by_key["e2e_vs_raw"].ok is None and by_key["e2e_vs_raw"].issue == "11"
    assert by_key["vs_naive"].issue == "4"
    md = "\n".join(report.cpu_section(results))
    assert "## CPU per job: the agent beside bare responders" in md
    assert "| paho echo (bench/echo.py) | 1,000.00 | 30.00 | 0.20 | 1.25x |" in md
    assert "The agent beyond the runtime: 1.0 ms CPU per job = 0.5x the paho echo's" in md
    assert any("cpu_600k_ms" in line and "MISSED" in line for line in report.ratio_lines(
        list(by_key.values())))
