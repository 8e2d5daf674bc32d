"""The files a run leaves: latest.json (the results with the ratios and the plots' names
in them), latest.md (`bench.report_markdown`) and the PNG plots (`bench.report_plots`).
The ratios against the targets are computed in `bench.targets`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report_markdown import cpu_section, markdown
from bench.report_plots import plots
from bench.targets import Ratio, ratio_lines, ratios

# Read as report.X by `python -m bench` and tests/test_bench_cpu.py.
__all__ = ["Ratio", "cpu_section", "ratio_lines", "ratios", "write"]


def write(results: dict[str, Any], out: Path, say: Callable[[str], None]) -> list[Ratio]:
    out.mkdir(parents=True, exist_ok=True)
    rs = ratios(results)
    results["ratios"] = [r.as_dict() for r in rs]
    try:
        results["plots"] = plots(results, out)
    except ImportError as exc:
        results["plots"] = []
        say(f"no plots: {exc} (pip install matplotlib)")
    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "latest.md").write_text(markdown(results, rs))
    return rs
