"""The app: three screens (profiles, run, results) as modes, and the run queue that outlives them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from textual import work
from textual.app import App
from textual.binding import Binding

from workbench.errors import Interrupted, ProfileError, WorkbenchError
from workbench.events import CancelToken, EventBus
from workbench.run.live_memory import MemorySampler
from workbench.tui.messages import RunEvent, RunFinished, ThrottledForwarder
from workbench.tui.run_state import RunJob, RunProgress, describe_result
from workbench.tui.screens.dialogs import ConfirmDialog
from workbench.tui.screens.help import HelpScreen
from workbench.tui.screens.profiles import ProfilesScreen
from workbench.tui.screens.results import ResultsScreen
from workbench.tui.screens.run import RunScreen


def _default_pipeline(*args: Any, **kwargs: Any) -> dict:
    from workbench.run.pipeline import run_safely

    return run_safely(*args, **kwargs)


class WorkbenchApp(App):
    TITLE = "workbench"
    CSS_PATH = "app.tcss"
    ENABLE_COMMAND_PALETTE = False  # its footer entry would push the app's own keys off an 80-column footer
    MODES = {"profiles": ProfilesScreen, "run": RunScreen, "results": ResultsScreen}
    BINDINGS = [
        Binding("1", "show('profiles')", "Profiles"),
        Binding("2", "show('run')", "Run"),
        Binding("3", "show('results')", "Results"),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, profiles_dir: Path, runs_dir: Path, registry: Any = None,
                 pipeline: Callable[..., dict] | None = None) -> None:
        super().__init__()
        self.profiles_dir = Path(profiles_dir)
        self.runs_dir = Path(runs_dir)
        self._plugins = registry
        self._pipeline = pipeline or _default_pipeline  # tests swap in a fake; the app never calls the engine
        self.queue: list[RunJob] = []
        self.progress: RunProgress | None = None  # the running job, or the last one to finish
        self._cancel: CancelToken | None = None
        self.run_view: RunScreen | None = None  # set by the run screen when it first mounts

    @property
    def registry(self) -> Any:
        if self._plugins is None:
            from workbench.registry import get_registry

            self._plugins = get_registry()
        return self._plugins

    def on_mount(self) -> None:
        self.switch_mode("profiles")

    # ------------------------------------------------------------------ navigation

    def action_show(self, mode: str) -> None:
        if self.current_mode != mode:
            self.switch_mode(mode)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        if not self.running:
            self.exit()
            return

        def answer(abandon: bool | None) -> None:
            if abandon:
                self.cancel_run()
                self.queue.clear()
                self.exit()

        self.push_screen(ConfirmDialog(f"A compression of '{self.progress.job.profile_name}' is running.\n"
                                       "Cancel it and quit? (its output directory is left as it was)",
                                       yes="Cancel run and quit", no="Keep running"), answer)

    # ------------------------------------------------------------------ runs

    @property
    def running(self) -> bool:
        return self.progress is not None and self.progress.finished is None

    def request_run(self, profile_path: Path) -> None:
        """Queue a run of the profile; an existing output directory is replaced only after a yes."""
        from workbench.profile.schema import load_profile

        try:
            profile = load_profile(profile_path, self.registry)
        except ProfileError as exc:
            self.notify("\n".join(str(p) for p in exc.problems[:3]), title="Cannot run: the profile has problems",
                        severity="error", timeout=10, markup=False)
            return
        output = Path(profile.output.dir)
        job = RunJob(profile_path, profile.name, output)
        job.profile = profile
        busy = [j for j in self._jobs() if j.output_dir == output]
        if output.exists() or busy:
            where = "is the output of a queued run" if busy and not output.exists() else "already exists"

            def answer(replace: bool | None) -> None:
                if replace:
                    job.force = True
                    self.enqueue(job)

            self.push_screen(ConfirmDialog(f"{output} {where}.\nReplace it with this run's output?",
                                           yes="Replace", no="Keep it"), answer)
            return
        self.enqueue(job)

    def _jobs(self) -> list[RunJob]:
        return ([self.progress.job] if self.running else []) + self.queue

    def enqueue(self, job: RunJob) -> None:
        self.queue.append(job)
        if self.running:
            self.notify(f"'{job.profile_name}' queued after the current run ({len(self.queue)} waiting)", markup=False)
        self._start_next()
        self._refresh_run_view()
        self.action_show("run")

    def cancel_run(self) -> None:
        if self.running and self._cancel is not None:
            self._cancel.cancel("cancelled from the app")
            self.progress.log.append("… cancelling at the next safe point")
            self._refresh_run_view(["… cancelling at the next safe point"])

    def drop_queued(self) -> RunJob | None:
        return self.queue.pop() if self.queue else None

    def _start_next(self) -> None:
        if self.running or not self.queue:
            return
        job = self.queue.pop(0)
        self.progress = RunProgress(job)
        self._cancel = CancelToken()
        self._execute(job, self._cancel)

    @work(thread=True, group="runs", exit_on_error=False)
    def _execute(self, job: RunJob, cancel: CancelToken) -> None:
        bus = EventBus()
        bus.subscribe(ThrottledForwarder(self.post_message, job.id))
        try:
            # "auto": a run cancelled earlier goes on from its checkpoint, unless the profile changed since.
            with MemorySampler(bus):  # host RSS and CUDA memory on the run screen, once a second
                report = self._pipeline(job.profile, output_dir=job.output_dir, force=job.force, events=bus,
                                        cancel=cancel, registry=self.registry, resume="auto")
            result = RunFinished(job.id, "done", report)
        except Interrupted as exc:
            again = "; run it again to go on from its checkpoint" if exc.checkpoint is not None else ""
            result = RunFinished(job.id, "cancelled", f"cancelled; the output directory was left as it was{again}")
        except WorkbenchError as exc:
            result = RunFinished(job.id, "failed", str(exc))
        except BaseException as exc:  # noqa: BLE001 - whatever happens, the app must hear the run ended
            result = RunFinished(job.id, "failed", f"{type(exc).__name__}: {exc}")
        self.post_message(result)

    def on_run_event(self, message: RunEvent) -> None:
        if self.progress is not None and self.progress.job.id == message.job_id:
            self._refresh_run_view(self.progress.apply(message.event))

    def on_run_finished(self, message: RunFinished) -> None:
        progress = self.progress
        if progress is None or progress.job.id != message.job_id:
            return
        progress.finished = message.status
        if message.status == "done":
            progress.outcome = describe_result(message.detail)
            self.notify(f"'{progress.job.profile_name}' finished: {progress.outcome}", timeout=8, markup=False)
        else:
            progress.outcome = str(message.detail)
            self.notify(f"'{progress.job.profile_name}' {message.status}: {progress.outcome}",
                        severity="warning" if message.status == "cancelled" else "error", timeout=10, markup=False)
        line = f"■ {message.status}: {progress.outcome}"
        progress.log.append(line)
        self._refresh_run_view([line])
        self._start_next()
        if self.progress is not progress:
            self._refresh_run_view(None)

    def _refresh_run_view(self, new_lines: list[str] | None = None) -> None:
        if self.run_view is not None:
            self.run_view.show(self.progress, self.queue, new_lines)
