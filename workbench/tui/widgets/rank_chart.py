"""Ranks per layer, one line per matrix type, drawn with textual-plotext."""

from __future__ import annotations

from typing import Any

from textual_plotext import PlotextPlot


def series(rows: list[dict[str, Any]], value: str) -> dict[str, tuple[list[int], list[float]]]:
    """{matrix type: (layers, values)}; a group shared by several layers gives each layer its value."""
    by_type: dict[str, dict[int, float]] = {}
    for row in rows if isinstance(rows, list) else []:  # a report edited by hand may hold anything
        number = row.get(value) if isinstance(row, dict) else None
        layers = row.get("layers") if isinstance(row, dict) else None
        if not isinstance(number, (int, float)) or isinstance(number, bool) or number != number:
            continue
        for layer in layers if isinstance(layers, list) else []:
            if isinstance(layer, int) and not isinstance(layer, bool):
                by_type.setdefault(str(row.get("type", "?")), {})[layer] = float(number)
    return {t: (sorted(points), [points[i] for i in sorted(points)]) for t, points in sorted(by_type.items())}


class RankChart(PlotextPlot):
    def __init__(self, rows: list[dict[str, Any]], value: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows, self.value = rows, value

    def on_mount(self) -> None:
        plt = self.plt
        data = series(self.rows, self.value)
        for matrix_type, (layers, values) in data.items():
            plt.plot(layers, values, label=matrix_type, marker="braille")
        plt.title(("rank kept" if self.value == "rank" else "effective rank") + " per layer")
        plt.xlabel("layer")
        if not data:
            plt.title(f"no {self.value} data in this report")
