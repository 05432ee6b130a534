"""Two or more runs side by side: one column per run, one row per fact or metric."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from workbench.render.literal import literal
from workbench.tui.runs_index import RunSummary, comparison_rows


class CompareScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, runs: list[RunSummary]) -> None:
        super().__init__()
        self.runs = runs

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"Comparing {len(self.runs)} runs", classes="title")
        yield DataTable(id="compare", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Compare"
        table = self.query_one(DataTable)
        table.add_column("")
        for r in self.runs:
            table.add_column(literal(r.path.name))
        for label, values in comparison_rows(self.runs):
            table.add_row(*map(literal, (label, *values)))
