"""The PNG plots of a run: raw batch-1 throughput, and end-to-end throughput and latency
by jobs in flight (the preprocess part draws its own, `preprocess.png`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.preprocess import plot as _preprocess_plot
from bench.raw import best_batch1


def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    # Raw batch-1 throughput by model and runtime.
    raw = {k: v for k, v in results.get("raw", {}).items() if not v.get("skipped")}
    if raw:
        labels = ["onnxruntime", "openvino-f32", "openvino-bf16"]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = []
            for entry in raw.values():
                b1 = entry["runtimes"].get(label, {}).get("batches", {}).get("1", {})
                values.append(b1.get("throughput_items_s") or 0.0)
            ax.bar([x + i * width for x in range(len(raw))], values, width, label=label)
        ax.set_xticks([x + width for x in range(len(raw))], list(raw))
        ax.set_yscale("log")
        ax.set_ylabel("inferences/s, batch 1, one thread")
        ax.set_title("Raw runtimes (missing bar: cannot load or skipped)")
        ax.legend()
        save(fig, "raw_batch1.png")

    agent = results.get("e2e", {}).get("agent", {}).get("models", {})
    served = {k: v for k, v in agent.items() if v.get("modes")}
    if served:
        for metric, fname, ylabel in (("throughput", "e2e_throughput.png", "jobs/s"),
                                      ("p50_ms", "e2e_latency.png", "p50 latency, ms")):
            cols = min(3, len(served))
            rows = (len(served) + cols - 1) // cols
            fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
            for ax, (name, entry) in zip(axes.flat, served.items(), strict=False):
                _series(ax, entry, results, name, metric)
                precision = f" {entry['precision']}" if entry.get("precision") else ""
                ax.set_title(f"{name} ({entry.get('runtime')}{precision})")
                ax.set_xscale("log", base=2)
                levels = sorted({p["concurrency"] for m in entry.get("modes", {}).values()
                                 for p in m["points"]})
                ax.set_xticks(levels, [str(v) for v in levels])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_yscale("log")
                ax.set_xlabel("jobs in flight")
                ax.set_ylabel(ylabel)
                ax.legend(fontsize=7)
            for ax in list(axes.flat)[len(served):]:
                ax.axis("off")
            save(fig, fname)
    _preprocess_plot(results, plt, save)
    return written


def _series(ax: Any, entry: dict[str, Any], results: dict[str, Any], name: str, metric: str) -> None:
    def line(points: list[dict[str, Any]], label: str, style: str) -> None:
        xs = [p["concurrency"] for p in points if p.get(metric)]  # skipped points have none
        ys = [p[metric] for p in points if p.get(metric)]
        if xs:
            ax.plot(xs, ys, style, label=label)

    for mode, m in entry.get("modes", {}).items():
        line(m["points"], f"agent {mode}", "o-")
    echo = results.get("e2e", {}).get("transport", {}).get(name, {})
    for mode, m in echo.get("modes", {}).items():
        line(m["points"], f"echo {mode}", "x--")
    naive = results.get("e2e", {}).get("naive", {})
    if naive.get("model") == name:
        line(naive["points"], "naive", "s:")
    if metric == "throughput":
        same = results.get("models", {}).get(name, {}).get("same_model_as") or name
        best = best_batch1(results.get("raw", {}).get(same, {}).get("runtimes", {}))
        if best:
            ax.axhline(best[0], color="grey", linestyle=":", label=f"best raw b1 ({best[1]})")
