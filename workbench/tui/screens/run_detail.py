"""One run: ranks per layer and effective ranks as charts, and its report."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown, TabbedContent, TabPane

from workbench.tui.runs_index import RunSummary
from workbench.tui.widgets.rank_chart import RankChart


class RunDetailScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, run: RunSummary) -> None:
        super().__init__()
        self.run = run

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent():
            with TabPane("Ranks", id="ranks-tab"):
                yield RankChart(self.run.report.get("ranks", []), "rank", id="rank-chart")
            with TabPane("Effective ranks", id="effective-tab"):
                yield RankChart(self.run.report.get("ranks", []), "effective_rank", id="effective-chart")
            with TabPane("Report", id="report-tab"):
                with VerticalScroll():
                    yield Markdown(self._report_text())
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"Run {self.run.path.name}"

    def _report_text(self) -> str:
        path = self.run.path / "report.md"
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            return f"# {self.run.profile}\n\n(no report.md in {self.run.path})"
