"""One sweep: the chart of a metric against the parameters kept (`m` goes to the next metric), and the
table of every cell."""

from __future__ import annotations

from typing import Any, Mapping

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from workbench.render.literal import literal
from workbench.render.sweep_table import cell_rows, metric_keys, series
from workbench.tui.runs_index import SweepSummary


class SweepChart(PlotextPlot):
    """The Pareto view: one line per allocator setting, metric against the share of parameters kept."""

    def __init__(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data = data
        self.keys = metric_keys(data)  # (evaluator, dataset, metric) of every metric measured
        self.shown = 0  # index into `keys`

    @property
    def key(self) -> tuple[str, str, str] | None:
        return self.keys[self.shown] if self.keys else None

    def on_mount(self) -> None:
        self.draw()

    def next_metric(self) -> None:
        if len(self.keys) > 1:
            self.shown = (self.shown + 1) % len(self.keys)
            self.draw()

    def draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        if self.key is None:
            plt.title("no metric in this sweep")
            return
        evaluator, dataset, metric = self.key
        for line, points in series(self.data, self.key).items():
            plt.plot([100 * x for x, _ in points], [y for _, y in points], label=line, marker="braille")
        where = f" on {dataset}" if dataset else ""
        more = f"   [{self.shown + 1}/{len(self.keys)}, m: next]" if len(self.keys) > 1 else ""
        plt.title(f"{metric} ({evaluator}{where}) against parameters kept{more}")
        plt.xlabel("parameters kept (% of the dense model)")
        self.refresh()


class SweepScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("m", "next_metric", "Next metric")]

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

    def action_next_metric(self) -> None:
        self.query_one(SweepChart).next_metric()

    def on_mount(self) -> None:
        self.sub_title = f"Sweep {self.sweep.path.name}"
        head, rows = cell_rows(self.sweep.data)
        table = self.query_one("#sweep-cells", DataTable)
        table.add_columns(*map(literal, head))
        for row in rows:
            table.add_row(*map(literal, row))
