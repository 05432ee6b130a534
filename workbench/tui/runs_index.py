"""Finished runs on disk: every subdirectory of the runs folder with a report.json. No Textual here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.render.numbers import format_seconds, format_short
from workbench.report import Metric, Report, ReportError, load_report


@dataclass(frozen=True)
class RunSummary:
    path: Path
    report: Report

    @property
    def profile(self) -> str:
        return self.report.profile_name or self.path.name

    @property
    def ratio(self) -> str:
        params = self.report.params
        value = params.ratio_targeted if params.ratio_targeted is not None else params.ratio_requested
        return "?" if value is None else f"{value:.3f}"

    @property
    def allocator(self) -> str:
        return self.report.allocator.name or "?"

    @property
    def metrics(self) -> list[Metric]:
        return self.report.metrics

    def metric_text(self, m: Metric) -> str:
        if m.error:
            return "error"
        return f"{format_short(m.dense)} → {format_short(m.compressed)}"

    @property
    def perplexity(self) -> str:
        hit = next((m for m in self.metrics if m.evaluator == "perplexity"), None)
        return self.metric_text(hit) if hit else "–"

    @property
    def other_metrics(self) -> str:
        rest = [m for m in self.metrics if m.evaluator != "perplexity"]
        return ", ".join(f"{m.name} {self.metric_text(m)}" for m in rest) or "–"

    @property
    def time(self) -> str:
        total = self.report.timings.get("total_s")
        return "?" if total is None else format_seconds(total)

    @property
    def group_size(self) -> str:
        compression = self.report.profile.get("compression")
        return str(compression.get("group_size", "default")) if isinstance(compression, dict) else "default"


def scan_runs(folder: Path) -> list[RunSummary]:
    """Runs sorted by directory name; unreadable reports are skipped (a run being written has none yet)."""
    if not folder.is_dir():
        return []
    runs = []
    for report_file in sorted(folder.glob("*/report.json")):
        try:
            runs.append(RunSummary(report_file.parent, load_report(report_file)))
        except ReportError:
            continue
    return runs


@dataclass(frozen=True)
class SweepSummary:
    """A sweep's output (its sweep.json, workbench/run/sweep.py): one entry of the results list."""

    path: Path
    data: dict

    @property
    def cells(self) -> list[dict]:
        return [c for c in self.data.get("cells", []) if isinstance(c, dict)]

    @property
    def profile(self) -> str:
        return str(self.data.get("profile_name") or self.path.name)

    @property
    def ratio(self) -> str:
        return f"sweep: {len(self.cells)} cells"

    @property
    def allocator(self) -> str:
        return ", ".join(dict.fromkeys(str(c.get("label", c.get("allocator", "?"))) for c in self.cells)) or "?"

    @property
    def perplexity(self) -> str:
        return "open to see"

    @property
    def other_metrics(self) -> str:
        failed = self.data.get("failed") or []
        return f"{len(failed)} failed" if failed else "–"

    @property
    def time(self) -> str:
        return format_seconds(self.data.get("timings", {}).get("total_s"))


def scan_sweeps(folder: Path) -> list[SweepSummary]:
    """Sweep outputs (a sweep.json) in `folder`; unreadable ones are skipped, like unreadable reports."""
    from workbench.errors import UsageError
    from workbench.run.sweep import load_sweep

    sweeps = []
    for file in sorted(folder.glob("*/sweep.json")) if folder.is_dir() else []:
        try:
            sweeps.append(SweepSummary(file.parent, load_sweep(file.parent)))
        except UsageError:
            continue
    return sweeps


def _label(m: Metric) -> tuple[str, str, str]:
    return str(m.evaluator), str(m.dataset), str(m.metric)


def comparison_rows(runs: list[RunSummary]) -> list[tuple[str, list[str]]]:
    """(label, one value per run) rows for the side-by-side view."""
    rows: list[tuple[str, list[str]]] = [
        ("profile", [r.profile for r in runs]),
        ("directory", [r.path.name for r in runs]),
        ("model", [r.report.model.source or "?" for r in runs]),
        ("ratio (targeted)", [r.ratio for r in runs]),
        ("allocator", [r.allocator for r in runs]),
        ("group size", [r.group_size for r in runs]),
    ]
    labels = list(dict.fromkeys(_label(m) for r in runs for m in r.metrics))
    for label in labels:
        values = []
        for r in runs:
            hit = next((m for m in r.metrics if _label(m) == label), None)
            values.append(r.metric_text(hit) if hit else "–")
        rows.append((f"{label[2]} ({Path(label[1]).name})", values))
    rows.append(("time", [r.time for r in runs]))
    rows.append(("compress time", [format_seconds(r.report.timings.get("compress_s")) for r in runs]))
    return rows
