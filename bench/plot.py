"""The suite's picture: speedup over the best dense SDPA per case, predicted vs measured vs FlexAttention."""

from __future__ import annotations

from pathlib import Path


def plot(results: list[dict], out: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cases = [f"{Path(r['file']).stem}" for r in results]
    series = [
        ("simulator upper bound", [r.get("sim_upper_bound") for r in results], "#c7c7c7"),
        ("predicted (calibrated)", [r.get("predicted_speedup_vs_dense") for r in results], "#9ecae1"),
        ("maskdsl measured", [r.get("speedup_vs_dense") for r in results], "#2171b5"),
        ("FlexAttention measured", [r.get("flex_speedup_vs_dense") for r in results], "#fd8d3c"),
    ]
    x = np.arange(len(cases))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 4.8))
    for i, (label, values, color) in enumerate(series):
        vals = [v if v else 0 for v in values]
        bars = ax.bar(x + (i - 1.5) * width, vals, width, label=label, color=color)
        for b, v in zip(bars, values):
            if v:
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
    ax.set_yscale("log")
    ax.set_xticks(x, cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speedup over best dense SDPA (log)")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(title or "maskdsl bench --suite", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
