"""The run screen: the running job's stage, layer i/N with a bar and ETA, memory, the training loss
of a [recovery] stage, queue and log.

It renders the app's RunProgress; the app pushes updates here, so a run goes on (and is shown up
to date) whichever screen is in front.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, RichLog, Sparkline, Static

from workbench.render.literal import escaped, literal
from workbench.tui.run_state import RunJob, RunProgress

IDLE = "No run yet. Press 1 for the profiles, pick one and press r to run it."


class RunScreen(Screen):
    BINDINGS = [
        Binding("c", "cancel", "Cancel run"),
        Binding("d", "drop", "Drop queued"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown: RunProgress | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(IDLE, id="run-title", classes="title")
        yield Static("", id="run-stage")
        with Horizontal(id="run-bar-row"):
            yield ProgressBar(total=1, show_eta=False, id="run-bar")
            yield Static("", id="run-counter")
        with Horizontal(id="run-memory-row"):
            yield Static("memory n/a", id="run-memory")
            yield Sparkline([], id="run-memory-chart")
        with Horizontal(id="run-loss-row"):  # shown while a [recovery] training reports its loss
            yield Static("", id="run-loss")
            yield Sparkline([], id="run-loss-chart")
        yield Static("", id="run-queue")
        yield RichLog(id="run-log", wrap=True, markup=False, max_lines=2000)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "Run"
        self.app.run_view = self
        self.show(self.app.progress, self.app.queue, None)
        self.set_interval(1.0, self._tick)  # the ETA moves even between events

    def _tick(self) -> None:
        if self._shown is not None and self._shown.finished is None:
            self._render_counter(self._shown)

    def show(self, progress: RunProgress | None, queue: list[RunJob], new_lines: list[str] | None) -> None:
        log = self.query_one("#run-log", RichLog)
        if progress is not self._shown or new_lines is None:
            log.clear()
            for line in progress.log if progress else []:
                log.write(literal(line))
            self._shown = progress
        else:
            for line in new_lines:
                log.write(literal(line))
        waiting = ", ".join(j.profile_name for j in queue)
        self.query_one("#run-queue", Static).update(literal(f"queued: {waiting}" if waiting else ""))
        if progress is None:
            return
        job = progress.job
        state = {None: "running", "done": "finished", "cancelled": "cancelled", "failed": "failed"}[progress.finished]
        self.query_one("#run-title", Static).update(
            f"[b]{escaped(job.profile_name)}[/b] → {escaped(job.output_dir)}/  ({state})")
        self.query_one("#run-stage", Static).update(literal(f"stage: {progress.stage}"))
        self._render_counter(progress)
        self.query_one("#run-memory", Static).update(literal(progress.memory_text()))
        self.query_one("#run-memory-chart", Sparkline).data = list(progress.memory_history)
        self.query_one("#run-loss-row").display = bool(progress.losses)
        if progress.losses:
            self.query_one("#run-loss", Static).update(literal(progress.loss_text()))
            self.query_one("#run-loss-chart", Sparkline).data = progress.losses[-240:]

    def _render_counter(self, progress: RunProgress) -> None:
        bar = self.query_one("#run-bar", ProgressBar)
        if progress.finished == "done":
            bar.update(total=1, progress=1)
        elif progress.total:
            bar.update(total=progress.total, progress=progress.current or 0)
        else:
            bar.update(total=1, progress=0)
        text = " · ".join(t for t in (progress.counter_text(), progress.eta_text() if not progress.finished else "") if t)
        self.query_one("#run-counter", Static).update(literal(text))

    def action_cancel(self) -> None:
        if self.app.running:
            self.app.cancel_run()
        else:
            self.notify("no run in progress")

    def action_drop(self) -> None:
        job = self.app.drop_queued()
        self.notify(f"dropped queued run of '{job.profile_name}'" if job else "no queued run", markup=False)
        self.show(self.app.progress, self.app.queue, [])
