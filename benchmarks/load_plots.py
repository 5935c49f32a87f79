"""PNG plots of a serve_load.py results.json (matplotlib, imported here only: the `bench` extra).

- throughput_vs_load.png: output tok/s against the offered Poisson rate, one line per system;
- latency_vs_load.png: TTFT and inter-token latency (p50 solid, p99 dashed) against the same rates;
- concurrency.png: the fixed-concurrency runs side by side: output tok/s, and ITL p50 / p99.
"""

from __future__ import annotations

import json
from pathlib import Path


def _label(run: dict, with_round: bool = False) -> str:
    label = "engine (in-process)" if run["system"] == "engine" else f"{run['system']} {run['protocol']}"
    return f"{label} r{run.get('round', 1)}" if with_round else label


def plot_results(results_json: Path, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(results_json).read_text())
    runs, settings = data["runs"], data["settings"]
    title = (f"{settings['num_requests']} requests, scale {settings['scale']}, {settings['dtype']}, "
             f"{settings['threads']} threads")
    written = []

    series: dict[str, list[dict]] = {}
    for r in runs:
        if r["mode"] == "poisson":
            series.setdefault(_label(r), []).append(r)
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: r["rate"])
            ax.plot([r["rate"] for r in rs], [r["summary"]["output_throughput"] for r in rs], "o-", label=label)
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"Throughput vs load\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "throughput_vs_load.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for i, (label, rs) in enumerate(series.items()):
            rs = sorted(rs, key=lambda r: r["rate"])
            x = [r["rate"] for r in rs]
            color = f"C{i}"
            for ax, key in zip(axes, ("ttft_ms", "itl_ms")):
                ax.plot(x, [r["summary"][key]["p50"] for r in rs], "o-", color=color, label=f"{label} p50")
                ax.plot(x, [r["summary"][key]["p99"] for r in rs], "s--", color=color, label=f"{label} p99")
        for ax, name in zip(axes, ("time to first token (ms)", "inter-token latency (ms)")):
            ax.set_xlabel("offered load (requests/s, Poisson)")
            ax.set_ylabel(name)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.suptitle(f"Latency vs load: {title}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "latency_vs_load.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    conc = [r for r in runs if r["mode"] == "concurrency"]
    if conc:
        several = len({r.get("round", 1) for r in conc}) > 1  # serve_load.py --rounds
        fig, axes = plt.subplots(1, 2, figsize=(14, 5) if several else (10, 4))
        labels = [_label(r, several) for r in conc]
        x = range(len(conc))
        # One colour per system (the engine runs bracket each server's in --rounds sweeps).
        kinds = list(dict.fromkeys(_label(r) for r in conc))
        bars = axes[0].bar(x, [r["summary"]["output_throughput"] for r in conc],
                           color=[f"C{kinds.index(_label(r))}" for r in conc])
        axes[0].bar_label(bars, fmt="%.1f", fontsize=8)
        axes[0].set_ylabel("output tokens/s")
        w = 0.38
        p50 = [r["summary"]["itl_ms"]["p50"] or 0 for r in conc]
        p99 = [r["summary"]["itl_ms"]["p99"] or 0 for r in conc]
        axes[1].bar([i - w / 2 for i in x], p50, w, label="ITL p50")
        axes[1].bar([i + w / 2 for i in x], p99, w, label="ITL p99")
        axes[1].set_ylabel("inter-token latency (ms)")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.set_xticks(list(x), labels, rotation=35 if several else 15, ha="right", fontsize=7)
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle(f"{conc[0]['concurrency']} concurrent streams: {title}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "concurrency.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
