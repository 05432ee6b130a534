"""The results screen: every run under the runs folder; mark two or more to compare them."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from workbench.render.literal import literal
from workbench.tui.runs_index import RunSummary, SweepSummary, scan_runs, scan_sweeps

COLUMNS = ("✓", "profile", "ratio", "allocator", "perplexity", "other metrics", "time", "directory")


class ResultsScreen(Screen):
    BINDINGS = [
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
        Binding("d", "details", "Details"),  # enter works too (the table's own key)
        Binding("g", "reload", "Reload"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[RunSummary | SweepSummary] = []  # a sweep is one entry; enter opens its table and chart
        self.marked: set[str] = set()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="results-title", classes="title")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Results"
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.reload()

    def on_screen_resume(self) -> None:
        self.reload()

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        self.runs = sorted([*scan_runs(self.app.runs_dir), *scan_sweeps(self.app.runs_dir)], key=lambda r: r.path.name)
        self.marked &= {str(r.path) for r in self.runs}
        table.clear()
        for r in self.runs:
            cells = (r.profile, r.ratio, r.allocator, r.perplexity, r.other_metrics, r.time, r.path.name)
            table.add_row("✓" if str(r.path) in self.marked else "", *map(literal, cells), key=str(r.path))
        if self.runs:
            table.move_cursor(row=min(row or 0, len(self.runs) - 1))
        self._title()

    def _title(self) -> None:
        if not self.runs:
            text = f"No runs in {self.app.runs_dir}/ yet: run a profile (1, then r)."
        else:
            text = f"{len(self.runs)} run(s) in {self.app.runs_dir}/ · {len(self.marked)} marked"
        self.query_one("#results-title", Static).update(literal(text))

    @property
    def selected(self) -> RunSummary | SweepSummary | None:
        table = self.query_one(DataTable)
        if not self.runs or not 0 <= table.cursor_row < len(self.runs):
            return None
        return self.runs[table.cursor_row]

    def action_mark(self) -> None:
        run = self.selected
        if run is None:
            return
        if isinstance(run, SweepSummary):
            self.notify("a sweep compares its own cells: press enter to open it")
            return
        key = str(run.path)
        self.marked ^= {key}
        table = self.query_one(DataTable)
        table.update_cell(key, table.ordered_columns[0].key, "✓" if key in self.marked else "")
        self._title()

    def action_compare(self) -> None:
        chosen = [r for r in self.runs if str(r.path) in self.marked]
        if len(chosen) < 2:
            self.notify("mark two or more runs with space first")
            return
        from workbench.tui.screens.compare import CompareScreen

        self.app.push_screen(CompareScreen(chosen))

    def on_data_table_row_selected(self, _: DataTable.RowSelected) -> None:
        self.action_details()

    def action_details(self) -> None:
        if isinstance(self.selected, SweepSummary):
            from workbench.tui.screens.sweep import SweepScreen

            self.app.push_screen(SweepScreen(self.selected))
        elif self.selected:
            from workbench.tui.screens.run_detail import RunDetailScreen

            self.app.push_screen(RunDetailScreen(self.selected))
