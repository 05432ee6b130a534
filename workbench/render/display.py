"""Headless renderers of engine events: rich live display, plain lines, JSON lines; the run summary.

Every renderer is a listener (`bus.subscribe(renderer)`) and a context manager, so the CLI can
treat them alike. Nothing here imports Textual: the app renders the same events its own way.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from datetime import datetime
from typing import IO, Any, Callable, Mapping

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from workbench.errors import UsageError
from workbench.render.literal import literal
from workbench.events import GPU_ALLOCATED, LOG, MEMORY, PROGRESS, STAGE_END, STAGE_START, WARNING, Event
from workbench.render.eta import StageEta
from workbench.render.numbers import format_bytes, format_change, format_count, format_figure, format_seconds
from workbench.report import Metric, Params, Report, load_report
from workbench.run.live_memory import MemorySample

MODES = ("auto", "live", "plain", "json")


# --------------------------------------------------------------------------- units


def _timestamp(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%dT%H:%M:%S")


def _progress_text(event: Event) -> str:
    """'layer 3/30' when the engine names its unit in data['unit'], else '3/30'."""
    unit = event.data.get("unit") if event.data else None
    count = f"{event.current}/{event.total}" if event.total else f"{event.current}"
    return f"{unit} {count}" if unit else count


class _Renderer:
    """Common listener shape: call it with events; use it as a context manager."""

    def __call__(self, event: Event) -> None:
        raise NotImplementedError

    def __enter__(self) -> "_Renderer":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


# --------------------------------------------------------------------------- plain lines


def _rank_of(event: Event) -> int:
    """The torchrun process an event came from (`data["rank"]`, relayed by run/rank_relay.py); 0 if none."""
    rank = (event.data or {}).get("rank", 0)
    return rank if isinstance(rank, int) and rank > 0 else 0


class PlainRenderer(_Renderer):
    """One timestamped line per event, for logs and pipes.

    Progress is throttled to one line per `interval` seconds per stage (the last step of a stage
    always prints), so a 30-layer run does not drown the log. `clock` exists for tests.
    """

    def __init__(self, stream: IO[str], interval: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self._last_progress: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()
        # the latest MEMORY reading per rank (torchrun: the others relayed onto process 0), appended to
        # each line of that rank
        self._samples: dict[int, MemorySample] = {}

    def __call__(self, event: Event) -> None:
        with self._lock:
            rank = _rank_of(event)
            if event.kind == MEMORY:  # periodic: shown on the next line printed, never a line of its own
                sample = MemorySample.from_data(event.data)
                if sample is not None:
                    self._samples[sample.rank] = sample
                return
            body = self._body(event, rank)
            if body is None:
                return
            line = f"{_timestamp(event.time)} [{event.stage}] {body}"
            if rank in self._samples:
                line += f"  {self._samples[rank].text()}"
            elif event.memory_bytes is not None:
                label = "gpu" if event.memory_kind == GPU_ALLOCATED else "rss"
                line += f"  {label} {format_bytes(event.memory_bytes)}"
            self.stream.write(line + "\n")
            self.stream.flush()

    def _body(self, event: Event, rank: int = 0) -> str | None:
        msg = event.message
        if event.kind == STAGE_START:
            self._started[event.stage] = event.time
            self._last_progress.pop(event.stage, None)
            return f"started{': ' + msg if msg else ''}"
        if event.kind == STAGE_END:
            start = self._started.pop(event.stage, None)
            took = f" in {format_seconds(event.time - start)}" if start is not None else ""
            return f"done{took}{': ' + msg if msg else ''}"
        if event.kind == PROGRESS:
            now = self.clock()
            key = event.stage if rank == 0 else f"{event.stage} rank {rank}"
            last = self._last_progress.get(key)
            finished = event.total is not None and event.current == event.total
            if not finished and last is not None and now - last < self.interval:
                return None
            self._last_progress[key] = now
            who = f"rank {rank}: " if rank else ""
            return f"{who}{_progress_text(event)}{' ' + msg if msg else ''}"
        if event.kind == WARNING:
            return f"WARNING: {msg}"
        if not msg and event.data:  # a kind added later that carries only data
            return json.dumps(event.data, default=str)
        return msg  # LOG, and kinds added later


# --------------------------------------------------------------------------- JSON lines


class JsonRenderer(_Renderer):
    """One JSON object per line (`Event.to_dict()`), flushed so a reader sees it at once."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.to_dict(), default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


# --------------------------------------------------------------------------- live display


class LiveRenderer(_Renderer):
    """A rich Live panel: stage, progress bar with count and ETA, memory, recent log lines.

    Events arrive on the engine's thread while rich refreshes on its own, so the state is guarded
    by a lock and the view is rebuilt from it on every refresh (which also keeps the ETA ticking
    between events).
    """

    def __init__(
        self,
        console: Console,
        refresh_per_second: float = 4,
        log_lines: int = 5,
        clock: Callable[[], float] = time.time,
    ):
        self.console = console
        self.clock = clock  # wall clock, like Event.time
        self._lock = threading.Lock()
        self._live = Live(self, console=console, refresh_per_second=refresh_per_second, transient=False)
        self._stage: str | None = None
        self._stage_start: float | None = None
        self._progress: Event | None = None
        self._memory: int | None = None
        self._peak_memory: int | None = None
        self._memory_kind: str | None = None
        self._samples: dict[int, MemorySample] = {}  # the latest MEMORY reading per rank
        self._peak_rss: dict[int, int] = {}
        self._rank_progress: dict[int, Event] = {}  # PROGRESS of ranks other than 0 (data["rank"])
        self._eta_clock = StageEta()
        self._done: list[tuple[str, float | None]] = []
        self._lines: deque[Text] = deque(maxlen=log_lines)

    def __enter__(self) -> "LiveRenderer":
        self._live.start(refresh=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.stop()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if event.memory_bytes is not None:
                if event.memory_kind != self._memory_kind:  # a peak of host RSS says nothing about the GPU
                    self._peak_memory, self._memory_kind = None, event.memory_kind
                self._memory = event.memory_bytes
                self._peak_memory = max(self._peak_memory or 0, event.memory_bytes)
            rank = _rank_of(event)
            if event.kind == MEMORY:
                sample = MemorySample.from_data(event.data)
                if sample is not None:
                    self._samples[sample.rank] = sample
                    self._peak_rss[sample.rank] = max(self._peak_rss.get(sample.rank, 0), sample.host_rss)
            elif event.kind == PROGRESS and rank > 0:
                self._rank_progress[rank] = event  # shown beside rank 0's bar, which it does not move
            elif event.kind == STAGE_START:
                self._stage, self._stage_start, self._progress = event.stage, event.time, None
                self._eta_clock.start(event.time)
            elif event.kind == STAGE_END:
                took = event.time - self._stage_start if self._stage == event.stage and self._stage_start else None
                self._done.append((event.stage, took))
                if self._stage == event.stage:
                    self._stage, self._stage_start, self._progress = None, None, None
            elif event.kind == PROGRESS:
                if self._stage != event.stage:  # progress without a stage_start: start timing here
                    self._stage, self._stage_start = event.stage, event.time
                    self._eta_clock.start(event.time)
                self._eta_clock.progress(event.current, event.time)
                self._progress = event
            elif event.kind == WARNING:
                self._lines.append(Text(f"{_timestamp(event.time)[11:]} [{event.stage}] warning: {event.message}", style="yellow"))
            elif event.kind == LOG and event.message:
                self._lines.append(Text(f"{_timestamp(event.time)[11:]} [{event.stage}] {event.message}", style="dim"))

    def eta(self) -> float | None:
        """Seconds left in the current stage, extrapolated from its elapsed time and fraction."""
        with self._lock:
            return self._eta(self.clock())

    def _eta(self, now: float) -> float | None:
        if self._progress is None:
            return None
        return self._eta_clock.remaining(self._progress.current, self._progress.total, now)

    def __rich__(self) -> Group:
        with self._lock:
            now = self.clock()
            parts: list[Any] = []
            if self._done:
                done = "  ".join(f"✓ {s} {format_seconds(t)}" if t is not None else f"✓ {s}" for s, t in self._done)
                parts.append(Text(done, style="green"))
            if self._stage is None:
                parts.append(Text("waiting…" if not self._done else "", style="dim"))
            else:
                head = Text.assemble((self._stage, "bold cyan"))
                if self._progress is not None and self._progress.message:
                    head.append(f"  {self._progress.message}")
                parts.append(head)
                elapsed = now - self._stage_start if self._stage_start is not None else None
                p = self._progress
                if p is not None and p.total:
                    bar = ProgressBar(total=p.total, completed=p.current or 0, width=40)
                    eta = self._eta(now)
                    info = f" {_progress_text(p)}  {p.fraction:.0%}  elapsed {format_seconds(elapsed)}"
                    info += f"  ETA {format_seconds(eta)}" if eta is not None and p.fraction < 1 else ""
                    row = Table.grid(padding=(0, 1))
                    row.add_row(bar, Text(info))
                    parts.append(row)
                elif elapsed is not None:
                    parts.append(Text(f"elapsed {format_seconds(elapsed)}", style="dim"))
            if self._rank_progress:
                parts.append(Text("  ".join(f"rank {r}: {e.stage} {_progress_text(e)}"
                                            for r, e in sorted(self._rank_progress.items())), style="dim"))
            if self._samples:
                for rank, sample in sorted(self._samples.items()):
                    who = f"rank {rank} " if len(self._samples) > 1 else ""
                    parts.append(Text(f"{who}memory: {sample.text()} (peak host RSS "
                                      f"{format_bytes(self._peak_rss[rank])})"))
            elif self._memory is not None:
                kind = "GPU allocated" if self._memory_kind == GPU_ALLOCATED else "host RSS"
                parts.append(Text(f"memory {format_bytes(self._memory)} ({kind}; peak {format_bytes(self._peak_memory)})"))
            parts.extend(self._lines)
            return Group(*parts)


# --------------------------------------------------------------------------- choosing one


def make_renderer(mode: str, console: Console) -> _Renderer:
    """'auto' is live on a terminal and plain lines otherwise; plain and json write to console.file."""
    if mode not in MODES:
        raise UsageError(f"unknown progress mode '{mode}'; allowed: {', '.join(MODES)}")
    if mode == "auto":
        mode = "live" if console.is_terminal else "plain"
    if mode == "live":
        return LiveRenderer(console)
    if mode == "json":
        return JsonRenderer(console.file)
    return PlainRenderer(console.file)


# --------------------------------------------------------------------------- summary


def _params_rows(table: Table, params: Params) -> None:
    for label, dense, comp, ratio in (
        ("parameters, targeted layers", params.targeted_dense, params.targeted_compressed, params.ratio_targeted),
        ("parameters, whole model", params.model_dense, params.model_compressed, params.ratio_model),
    ):
        if ratio is None and dense and comp is not None:
            ratio = 1 - comp / dense
        if dense is None and comp is None and ratio is None:
            continue
        change = f"{ratio:.1%} removed" if ratio is not None else ""
        table.add_row(label, format_count(dense), format_count(comp), change)


def _metric_rows(table: Table, metrics: list[Metric]) -> None:
    """One row per evaluator's headline value, then one indented row per figure it lists."""
    for m in metrics:
        metric = m.metric or ""
        name = m.name
        if m.evaluator and m.evaluator != name:
            name = f"{m.evaluator} {name}"
        if m.dataset:
            name += f" ({m.dataset})"
        if m.compressed is None and m.error:
            table.add_row(literal(name), format_figure(m.dense, metric), Text("failed", style="red"),
                          Text(m.error[:60], style="red"))
        else:
            table.add_row(literal(name), format_figure(m.dense, metric), format_figure(m.compressed, metric),
                          format_change(m.dense, m.compressed))
        dense_figures, comp_figures = m.figures("dense"), m.figures("compressed")
        for figure in dict.fromkeys([*dense_figures, *comp_figures]):
            d, c = dense_figures.get(figure), comp_figures.get(figure)
            table.add_row(literal(f"  {figure}"), format_figure(d, figure), format_figure(c, figure),
                          format_change(d, c))


def summary_table(report: Report | Mapping[str, Any] | None) -> Table:
    """The end-of-run summary: parameters and metrics dense → compressed, time, peak memory.

    `report` is a `Report` or report.json's contents, of any format (read with `load_report`).
    """
    r = load_report(report or {})
    blocks: list[Any] = []

    results = Table(title="dense → compressed", title_justify="left")
    results.add_column("")
    results.add_column("dense", justify="right")
    results.add_column("compressed", justify="right")
    results.add_column("change", justify="right")
    _params_rows(results, r.params)
    if r.metrics:
        results.add_section()
        _metric_rows(results, r.metrics)
    if results.row_count:
        blocks.append(results)

    resources = Table(title="time and memory", title_justify="left", show_header=False)
    resources.add_column("")
    resources.add_column("", justify="right")
    for stage, seconds in r.timings.items():
        if stage != "total_s":
            resources.add_row(literal(stage.removesuffix("_s")), format_seconds(seconds))
    if "total_s" in r.timings:
        resources.add_row(Text("total", style="bold"), Text(format_seconds(r.timings["total_s"]), style="bold"))
    peak = r.peak_memory
    if peak.rss_bytes is not None or peak.cuda_bytes is not None:
        if resources.row_count:
            resources.add_section()
        if peak.rss_bytes is not None:
            resources.add_row("peak memory (RSS)", format_bytes(peak.rss_bytes))
        if peak.cuda_bytes is not None:
            resources.add_row("peak GPU memory", format_bytes(peak.cuda_bytes))
    if resources.row_count:
        blocks.append(resources)
    if r.compensation:
        from workbench.render.report_md import compensation_text

        blocks.append(Text("compensation: " + compensation_text(r.compensation)))
    if r.recovery:
        from workbench.render.report_md import recovery_text

        blocks.append(Text("recovery: " + recovery_text(r.recovery)))
    if r.resumed_from_checkpoint:
        reused = ", ".join(r.resumed_from_checkpoint)
        blocks.append(Text(f"resumed from a checkpoint: {reused} (times cover this run only)"))
    if r.output_dir:
        blocks.append(Text(f"output: {r.output_dir}"))
    if r.notes:  # a damaged or hand-edited report: say what was left out rather than fail
        blocks.append(Text("left out (unreadable in report.json): " + "; ".join(r.notes), style="yellow"))

    outer = Table.grid()
    for i, block in enumerate(blocks):
        if i:
            outer.add_row(Text(""))  # a blank line between blocks
        outer.add_row(block)
    return outer


def print_summary(console: Console, report: Report | Mapping[str, Any]) -> None:
    console.print(summary_table(report))
