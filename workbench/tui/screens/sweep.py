"""One sweep: the chart of its first metric against the parameters kept, and the table of every cell."""

from __future__ import annotations

from typing import Any, Mapping

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from workbench.render.literal import literal
from workbench.render.sweep_table import cell_rows, pick_metric, series
from workbench.tui.runs_index import SweepSummary


class SweepChart(PlotextPlot):
    """The Pareto view: one line per allocator setting, metric against the share of parameters kept."""

    def __init__(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data = data

    def on_mount(self) -> None:
        plt = self.plt
        try:
            key = pick_metric(self.data, None)
        except ValueError:
            plt.title("no metric in this sweep")
            return
        for line, points in series(self.data, key).items():
            plt.plot([100 * x for x, _ in points], [y for _, y in points], label=line, marker="braille")
        plt.title(f"{key[2]} against parameters kept")
        plt.xlabel("parameters kept (% of the dense model)")


class SweepScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, sweep: SweepSummary) -> None:
        super().__init__()
        self.sweep = sweep

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent():
            with TabPane("Chart", id="sweep-chart-tab"):
                yield SweepChart(self.sweep.data, id="sweep-chart")
            with TabPane("Cells", id="sweep-cells-tab"):
                yield DataTable(id="sweep-cells", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"Sweep {self.sweep.path.name}"
        head, rows = cell_rows(self.sweep.data)
        table = self.query_one("#sweep-cells", DataTable)
        table.add_columns(*map(literal, head))
        for row in rows:
            table.add_row(*map(literal, row))
