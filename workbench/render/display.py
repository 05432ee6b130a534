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
from workbench.events import LOG, PROGRESS, RESULT, STAGE_END, STAGE_START, WARNING, Event

MODES = ("auto", "live", "plain", "json")


# --------------------------------------------------------------------------- units


def format_bytes(n: float | None) -> str:
    """1288490188 -> '1.2 GiB'."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_seconds(s: float | None) -> str:
    """3.21 -> '3.2 s', 125 -> '2 m 05 s', 7300 -> '2 h 01 m'."""
    if s is None:
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60} m {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} m"


def format_count(n: float | None) -> str:
    """134515008 -> '134.5 M' (parameter counts)."""
    if n is None:
        return "n/a"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n:.0f}"


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

    def __call__(self, event: Event) -> None:
        with self._lock:
            body = self._body(event)
            if body is None:
                return
            line = f"{_timestamp(event.time)} [{event.stage}] {body}"
            if event.memory_bytes is not None:
                line += f"  rss {format_bytes(event.memory_bytes)}"
            self.stream.write(line + "\n")
            self.stream.flush()

    def _body(self, event: Event) -> str | None:
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
            last = self._last_progress.get(event.stage)
            finished = event.total is not None and event.current == event.total
            if not finished and last is not None and now - last < self.interval:
                return None
            self._last_progress[event.stage] = now
            return f"{_progress_text(event)}{' ' + msg if msg else ''}"
        if event.kind == WARNING:
            return f"WARNING: {msg}"
        if event.kind == RESULT and not msg:
            return json.dumps(event.data, default=str)
        return msg  # LOG, RESULT with a message, and kinds added later


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
                self._memory = event.memory_bytes
                self._peak_memory = max(self._peak_memory or 0, event.memory_bytes)
            if event.kind == STAGE_START:
                self._stage, self._stage_start, self._progress = event.stage, event.time, None
            elif event.kind == STAGE_END:
                took = event.time - self._stage_start if self._stage == event.stage and self._stage_start else None
                self._done.append((event.stage, took))
                if self._stage == event.stage:
                    self._stage, self._stage_start, self._progress = None, None, None
            elif event.kind == PROGRESS:
                if self._stage != event.stage:  # progress without a stage_start: start timing here
                    self._stage, self._stage_start = event.stage, event.time
                self._progress = event
            elif event.kind == WARNING:
                self._lines.append(Text(f"{_timestamp(event.time)[11:]} [{event.stage}] warning: {event.message}", style="yellow"))
            elif event.kind in (LOG, RESULT) and event.message:
                self._lines.append(Text(f"{_timestamp(event.time)[11:]} [{event.stage}] {event.message}", style="dim"))

    def eta(self) -> float | None:
        """Seconds left in the current stage, extrapolated from its elapsed time and fraction."""
        with self._lock:
            return self._eta(self.clock())

    def _eta(self, now: float) -> float | None:
        fraction = self._progress.fraction if self._progress else None
        if not fraction or self._stage_start is None:
            return None
        elapsed = max(0.0, now - self._stage_start)
        return elapsed * (1 - fraction) / fraction

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
            if self._memory is not None:
                parts.append(Text(f"memory {format_bytes(self._memory)} (peak {format_bytes(self._peak_memory)})"))
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


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt_value(v: float | None, name: str = "") -> str:
    if v is None:
        return "n/a"
    if "bytes" in name:  # memory figures: 1.2 GiB rather than 1,288,490,188
        return format_bytes(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def _change(dense: float | None, compressed: float | None) -> str:
    if dense is None or compressed is None or dense == 0:
        return ""
    return f"×{compressed / dense:.3f} ({(compressed - dense) / abs(dense):+.1%})"


def _params_rows(table: Table, params: Mapping[str, Any]) -> None:
    for label, prefix, ratio_key in (
        ("parameters, targeted layers", "targeted", "ratio_targeted"),
        ("parameters, whole model", "model", "ratio_model"),
    ):
        dense, comp = _num(params.get(f"{prefix}_dense")), _num(params.get(f"{prefix}_compressed"))
        ratio = _num(params.get(ratio_key))
        if ratio is None and dense and comp is not None:
            ratio = 1 - comp / dense
        if dense is None and comp is None and ratio is None:
            continue
        change = f"{ratio:.1%} removed" if ratio is not None else ""
        table.add_row(label, format_count(dense), format_count(comp), change)


def _figures(metric: Mapping[str, Any], label: str) -> Mapping[str, Any]:
    details = metric.get("details")
    side = details.get(label) if isinstance(details, Mapping) else None
    figures = side.get("figures") if isinstance(side, Mapping) else None
    return figures if isinstance(figures, Mapping) else {}


def _metric_rows(table: Table, metrics: list[Mapping[str, Any]]) -> None:
    """One row per evaluator's headline value, then one indented row per figure it lists."""
    for m in metrics:
        metric = m.get("metric") or ""
        name = metric or m.get("evaluator") or "?"
        if m.get("evaluator") and m.get("evaluator") != name:
            name = f"{m['evaluator']} {name}"
        if m.get("dataset"):
            name += f" ({m['dataset']})"
        dense, comp = _num(m.get("dense")), _num(m.get("compressed"))
        if comp is None and m.get("error"):
            table.add_row(name, _fmt_value(dense, metric), Text("failed", style="red"),
                          Text(str(m["error"])[:60], style="red"))
        else:
            table.add_row(name, _fmt_value(dense, metric), _fmt_value(comp, metric), _change(dense, comp))
        dense_figures, comp_figures = _figures(m, "dense"), _figures(m, "compressed")
        for figure in dict.fromkeys([*dense_figures, *comp_figures]):
            d, c = _num(dense_figures.get(figure)), _num(comp_figures.get(figure))
            table.add_row(f"  {figure}", _fmt_value(d, figure), _fmt_value(c, figure), _change(d, c))


def summary_table(report: Mapping[str, Any]) -> Table:
    """The end-of-run summary: parameters and metrics dense → compressed, time, peak memory."""
    report = report or {}
    blocks: list[Any] = []

    results = Table(title="dense → compressed", title_justify="left")
    results.add_column("")
    results.add_column("dense", justify="right")
    results.add_column("compressed", justify="right")
    results.add_column("change", justify="right")
    params = report.get("params") or {}
    if isinstance(params, Mapping):
        _params_rows(results, params)
    metrics = report.get("metrics") or []
    if metrics:
        results.add_section()
        _metric_rows(results, [m for m in metrics if isinstance(m, Mapping)])
    if results.row_count:
        blocks.append(results)

    resources = Table(title="time and memory", title_justify="left", show_header=False)
    resources.add_column("")
    resources.add_column("", justify="right")
    timings = report.get("timings") or {}
    if isinstance(timings, Mapping):
        for stage, seconds in timings.items():
            if stage != "total_s" and _num(seconds) is not None:
                resources.add_row(stage.removesuffix("_s"), format_seconds(seconds))
        if _num(timings.get("total_s")) is not None:
            resources.add_row(Text("total", style="bold"), Text(format_seconds(timings["total_s"]), style="bold"))
    peak = report.get("peak_memory")
    if _num(peak) is not None:  # tolerate a bare byte count
        peak = {"rss_bytes": peak}
    if isinstance(peak, Mapping):
        if resources.row_count:
            resources.add_section()
        if _num(peak.get("rss_bytes")) is not None:
            resources.add_row("peak memory (RSS)", format_bytes(peak["rss_bytes"]))
        if _num(peak.get("cuda_bytes")) is not None:
            resources.add_row("peak GPU memory", format_bytes(peak["cuda_bytes"]))
    if resources.row_count:
        blocks.append(resources)
    if report.get("resumed_from_checkpoint"):
        reused = ", ".join(str(r) for r in report["resumed_from_checkpoint"])
        blocks.append(Text(f"resumed from a checkpoint: {reused} (times cover this run only)"))
    if report.get("output_dir"):
        blocks.append(Text(f"output: {report['output_dir']}"))

    outer = Table.grid()
    for i, block in enumerate(blocks):
        if i:
            outer.add_row(Text(""))  # a blank line between blocks
        outer.add_row(block)
    return outer


def print_summary(console: Console, report: Mapping[str, Any]) -> None:
    console.print(summary_table(report))
