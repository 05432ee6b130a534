"""`workbench sweep-plot`: a sweep's metric against the parameters kept, one line per allocator setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from workbench.render.sweep_table import dense_value, pick_metric, series


def plot_sweep_png(summary: Mapping[str, Any], path: Path, metric: str | None = None, log_y: bool = False) -> None:
    """Write the Pareto view of `summary` (sweep.json's content) as a PNG; the dense value as a dashed line.

    Raises ImportError (with the install line) without matplotlib, ValueError for an unknown metric."""
    key = pick_metric(summary, metric)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("sweep-plot needs matplotlib: pip install 'workbench[plot]'") from exc
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for line, points in series(summary, key).items():
        ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", lw=1.2, label=line)
    dense = dense_value(summary, key)
    if isinstance(dense, (int, float)):
        ax.axhline(dense, color="grey", ls="--", lw=0.8, label="dense")
    if log_y:
        ax.set_yscale("log")
    evaluator, dataset, name = key
    ax.set_xlabel("parameters kept (% of the dense model)")
    ax.set_ylabel(f"{name} ({Path(dataset).name})" if dataset else name)
    model = summary.get("model", {}).get("source", "?")
    ax.set_title(f"{summary.get('profile_name', 'sweep')}: {model}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
