"""Finished runs on disk: every subdirectory of the runs folder with a report.json. No Textual here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.render.display import format_seconds


@dataclass(frozen=True)
class RunSummary:
    path: Path
    report: dict[str, Any]

    @property
    def profile(self) -> str:
        return str(self.report.get("profile_name", self.path.name))

    @property
    def ratio(self) -> str:
        params = self.report.get("params") or {}
        value = params.get("ratio_targeted", params.get("ratio_requested"))
        return f"{value:.3f}" if isinstance(value, (int, float)) else "?"

    @property
    def allocator(self) -> str:
        return str((self.report.get("allocator") or {}).get("name", "?"))

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return [m for m in self.report.get("metrics", []) if isinstance(m, dict)]

    def metric_text(self, m: dict[str, Any]) -> str:
        if m.get("error"):
            return "error"
        return f"{_num(m.get('dense'))} → {_num(m.get('compressed'))}"

    @property
    def perplexity(self) -> str:
        hit = next((m for m in self.metrics if m.get("evaluator") == "perplexity"), None)
        return self.metric_text(hit) if hit else "–"

    @property
    def other_metrics(self) -> str:
        rest = [m for m in self.metrics if m.get("evaluator") != "perplexity"]
        return ", ".join(f"{m.get('metric') or m.get('evaluator')} {self.metric_text(m)}" for m in rest) or "–"

    @property
    def time(self) -> str:
        total = (self.report.get("timings") or {}).get("total_s")
        return format_seconds(total) if isinstance(total, (int, float)) else "?"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def scan_runs(folder: Path) -> list[RunSummary]:
    """Runs sorted by directory name; unreadable reports are skipped (a run being written has none yet)."""
    if not folder.is_dir():
        return []
    runs = []
    for report_file in sorted(folder.glob("*/report.json")):
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict):
            runs.append(RunSummary(report_file.parent, report))
    return runs


def comparison_rows(runs: list[RunSummary]) -> list[tuple[str, list[str]]]:
    """(label, one value per run) rows for the side-by-side view."""
    rows: list[tuple[str, list[str]]] = [
        ("profile", [r.profile for r in runs]),
        ("directory", [r.path.name for r in runs]),
        ("model", [str((r.report.get("model") or {}).get("source", "?")) for r in runs]),
        ("ratio (targeted)", [r.ratio for r in runs]),
        ("allocator", [r.allocator for r in runs]),
        ("group size", [str(((r.report.get("profile") or {}).get("compression") or {}).get("group_size", "default"))
                        for r in runs]),
    ]
    labels: list[tuple[str, str, str]] = []
    for r in runs:
        for m in r.metrics:
            label = (str(m.get("evaluator")), str(m.get("dataset")), str(m.get("metric")))
            if label not in labels:
                labels.append(label)
    for label in labels:
        values = []
        for r in runs:
            hit = next((m for m in r.metrics
                        if (str(m.get("evaluator")), str(m.get("dataset")), str(m.get("metric"))) == label), None)
            values.append(r.metric_text(hit) if hit else "–")
        rows.append((f"{label[2]} ({Path(label[1]).name})", values))
    rows.append(("time", [r.time for r in runs]))
    rows.append(("compress time", [format_seconds((r.report.get("timings") or {}).get("compress_s")) for r in runs]))
    return rows
