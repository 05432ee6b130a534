"""`workbench inspect`'s rank map drawn: a fixed-width table for the terminal and a PNG of panels.

`data` is what `workbench.run.rank_map.rank_map` returns.
"""

from __future__ import annotations

from typing import Any


def render_table(data: dict[str, Any]) -> str:
    """Plain fixed-width text: one line per group, ordered by layer then matrix type."""
    names = data["allocators"]
    head = ["layers", "type", "in×out", "max", "R_eff", *names]
    order = {t: i for i, t in enumerate(dict.fromkeys(r["type"] for r in data["rows"]))}
    rows = sorted(data["rows"], key=lambda r: (r["layers"][0], order[r["type"]]))
    body = [[_layers(r["layers"]), r["type"], f"{r['in']}×{r['out']}", str(r["max_rank"]),
             f"{r['effective_rank']:.1f}", *(str(r["ranks"][n]) for n in names)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [f"{data['model']}: ratio {data['ratio']}, budget {data['budget']:,} parameters; "
             "R_eff = effective rank of the whitened group, max = break-even rank (dense from there)"]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    lines.append("ratio achieved: " + ", ".join(f"{n} {data['ratio_targeted'][n]:.4f}" for n in names))
    return "\n".join(lines)


def _layers(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def plot_png(data: dict[str, Any], path) -> None:
    """One panel per matrix type: each allocator's rank by layer (as a share of max_rank), and R_eff."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'workbench[plot]'") from exc
    types = list(dict.fromkeys(r["type"] for r in data["rows"]))
    cols = min(4, len(types))
    rows_n = -(-len(types) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), sharey=True, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(types):]:
        ax.axis("off")
    for ax, mtype in zip(flat, types):
        rows = sorted((r for r in data["rows"] if r["type"] == mtype), key=lambda r: r["layers"][0])
        x = [sum(r["layers"]) / len(r["layers"]) for r in rows]
        for name in data["allocators"]:
            ax.plot(x, [r["ranks"][name] / r["max_rank"] for r in rows], marker=".", lw=1, label=name)
        twin = ax.twinx()
        twin.plot(x, [r["effective_rank"] for r in rows], color="grey", ls="--", lw=0.8)
        twin.tick_params(labelsize=6, colors="grey")
        ax.set_title(mtype, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
    for row in axes:
        row[0].set_ylabel("rank / break-even rank", fontsize=8)
    handles, labels = flat[0].get_legend_handles_labels()
    (flat[-1] if len(flat) > len(types) else flat[0]).legend(handles, labels, fontsize=7, loc="center")
    fig.suptitle(f"{data['model']} at ratio {data['ratio']} (dashed grey: effective rank, right axis)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
