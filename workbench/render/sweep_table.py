"""A sweep's results (sweep.json, workbench/run/sweep.py) as tables: sweep.md, the terminal summary,
and the (parameters kept, metric) series the charts draw, one per line of the sweep.

A "line" is what the cells share but the ratio: the allocator's label plus `-seq` / `-<update>`, so
each line of a chart is one allocator setting across ratios (the Pareto view). Reading is lenient:
a value missing or of the wrong type shows as "n/a", it never raises.
"""

from __future__ import annotations

from typing import Any, Mapping

from workbench.render.numbers import as_number, format_count, format_figure, format_seconds


def line_of(row: Mapping[str, Any]) -> str:
    """The cell's name without its ratio: one chart line per allocator setting."""
    label = row.get("label")
    if not isinstance(label, str):
        return str(row.get("cell", "?"))
    update = row.get("update")
    return label + ("-seq" if row.get("sequential") is True else "") + (
        f"-{update}" if isinstance(update, str) and update != "none" else "")


def metric_keys(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(evaluator, dataset, metric) of every metric the sweep measured, in order of first appearance."""
    keys: dict[tuple[str, str, str], None] = {}
    for m in [*summary.get("dense", []), *(m for r in summary.get("cells", []) for m in r.get("metrics", []))]:
        if isinstance(m, Mapping):
            keys[(str(m.get("evaluator", "?")), str(m.get("dataset", "")), str(m.get("metric", "?")))] = None
    return list(keys)


def _key(m: Mapping[str, Any]) -> tuple[str, str, str]:
    return str(m.get("evaluator", "?")), str(m.get("dataset", "")), str(m.get("metric", "?"))


def _value(row: Mapping[str, Any], key: tuple[str, str, str], which: str = "compressed") -> Any:
    hit = next((m for m in row.get("metrics", []) if isinstance(m, Mapping) and _key(m) == key), None)
    return None if hit is None else hit.get(which)


def dense_value(summary: Mapping[str, Any], key: tuple[str, str, str]) -> Any:
    hit = next((m for m in summary.get("dense", []) if isinstance(m, Mapping) and _key(m) == key), None)
    return None if hit is None else hit.get("dense")


def pick_metric(summary: Mapping[str, Any], wanted: str | None) -> tuple[str, str, str]:
    """The metric named `wanted` (its name, its evaluator's or "evaluator:metric"), else the first one.
    Raises ValueError listing the choices when nothing matches."""
    keys = metric_keys(summary)
    if not keys:
        raise ValueError("the sweep measured no metric")
    if wanted is None:
        return keys[0]
    for key in keys:
        if wanted in (key[2], key[0], f"{key[0]}:{key[2]}"):
            return key
    raise ValueError(f"no metric {wanted!r} in this sweep; choose one of "
                     + ", ".join(dict.fromkeys(f"{e}:{m}" for e, _, m in keys)))


def _label(key: tuple[str, str, str]) -> str:
    evaluator, dataset, metric = key
    name = metric if evaluator in (metric, "?") else f"{evaluator} {metric}"
    return f"{name} ({dataset.rsplit('/', 1)[-1]})" if dataset else name


def series(summary: Mapping[str, Any], key: tuple[str, str, str]) -> dict[str, list[tuple[float, float]]]:
    """{line: [(share of the dense model's parameters kept, metric value)], sorted by share kept}."""
    dense = as_number(summary.get("params", {}).get("model_dense"))
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in summary.get("cells", []):
        kept, value = as_number(row.get("params_model")), as_number(_value(row, key))
        if kept is None or value is None:
            continue
        lines.setdefault(line_of(row), []).append((kept / dense if dense else kept, value))
    return {line: sorted(points) for line, points in lines.items()}


def _ratio_text(value: Any) -> str:
    v = as_number(value)
    return "n/a" if v is None else f"{v:.1%}"


def cell_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-cell table: ratios, parameters kept, each metric compressed, time."""
    keys = metric_keys(summary)
    head = ["cell", "allocator", "ratio", "targeted", "model", "params kept", *(_label(k) for k in keys), "time"]
    rows = [["dense", "", "", "", "", format_count(summary.get("params", {}).get("model_dense")),
             *(format_figure(dense_value(summary, k), k[2]) for k in keys), ""]]
    for r in summary.get("cells", []):
        if "error" in r:
            rows.append([str(r.get("cell", "?")), str(r.get("allocator", "?")), _ratio_text(r.get("ratio")),
                         "failed", "", "", *("" for _ in keys), format_seconds(r.get("time_s"))])
            continue
        values = [("failed" if _value(r, k, "error") else format_figure(_value(r, k), k[2])) for k in keys]
        time = format_seconds(r.get("time_s")) + (" (earlier run)" if r.get("resumed") else "")
        rows.append([str(r.get("cell", "?")), str(r.get("allocator", "?")), _ratio_text(r.get("ratio")),
                     _ratio_text(r.get("ratio_targeted")), _ratio_text(r.get("ratio_model")),
                     format_count(r.get("params_model")), *values, time])
    return head, rows


def pivot(summary: Mapping[str, Any], key: tuple[str, str, str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per line, one column per requested ratio, the metric in each cell."""
    ratios = sorted({r["ratio"] for r in summary.get("cells", []) if as_number(r.get("ratio")) is not None})
    lines = list(dict.fromkeys(line_of(r) for r in summary.get("cells", [])))
    cell = {(line_of(r), r.get("ratio")): _value(r, key) for r in summary.get("cells", [])}
    head = [_label(key), *(f"{x:.0%}" if abs(x * 100 - round(x * 100)) < 1e-9 else f"{x:.1%}" for x in ratios)]
    rows = [[line, *(format_figure(cell.get((line, x)), key[2], "—") for x in ratios)] for line in lines]
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    return ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(esc(c) for c in row) + " |" for row in rows)]


def render_sweep_md(summary: Mapping[str, Any]) -> str:
    model = summary.get("model", {})
    timings = summary.get("timings", {})
    lines = [f"# Sweep: {summary.get('profile_name', '?')}", "",
             f"Model `{model.get('source', '?')}` ({model.get('adapter', '?')}, {model.get('dtype', '?')} on "
             f"{model.get('device', '?')}); {len(summary.get('cells', []))} cells sharing one calibration "
             f"({summary.get('calibration', {}).get('tokens', '?')} tokens)"
             + (f" and the signals {', '.join(summary['signals'])}" if summary.get("signals") else "") + ".", ""]
    keys = metric_keys(summary)
    if keys:
        dense = format_figure(dense_value(summary, keys[0]), keys[0][2])
        lines += [f"## {_label(keys[0])} by ratio (dense {dense})", "", *_md_table(*pivot(summary, keys[0])), ""]
    lines += ["## Every cell", "", "ratio: requested; targeted / model: parameters removed from the targeted "
              "layers / the whole model; time: the cell's own stages.", "", *_md_table(*cell_rows(summary)), ""]
    shared = timings.get("shared", {})
    stages = ", ".join(f"{stage} {format_seconds(s)}" for stage, s in shared.items())
    lines += ["## Time", "", f"shared (once for all cells): {stages}; total {format_seconds(timings.get('shared_s'))}",
              "",  # a paragraph each
              f"cells: {format_seconds(timings.get('cells_s'))}; sweep total: {format_seconds(timings.get('total_s'))}"]
    if summary.get("resumed_from_checkpoint"):
        lines.append("resumed from a checkpoint: " + ", ".join(summary["resumed_from_checkpoint"]))
    if summary.get("failed"):
        lines += ["", "Failed: " + ", ".join(summary["failed"]) + " (see each cell's report.md or the log)."]
    lines += ["", "Each cell's folder holds its own report.json, report.md and (if saved) model/."]
    return "\n".join(lines) + "\n"


def print_sweep_summary(console: Any, summary: Mapping[str, Any]) -> None:
    """The end-of-sweep summary in the terminal: the pivot of the first metric, then every cell."""
    from rich.table import Table
    from rich.text import Text

    keys = metric_keys(summary)
    tables = []
    if keys:
        tables.append((f"{_label(keys[0])}; dense {format_figure(dense_value(summary, keys[0]), keys[0][2])}",
                       *pivot(summary, keys[0])))
    tables.append(("every cell", *cell_rows(summary)))
    for title, head, rows in tables:
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(head):
            table.add_column(Text(h), justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(Text(c) for c in row))
        console.print(table)
    timings = summary.get("timings", {})
    console.print(Text(f"shared stages {format_seconds(timings.get('shared_s'))}, cells "
                       f"{format_seconds(timings.get('cells_s'))}, total {format_seconds(timings.get('total_s'))}"))
    console.print(Text(f"output: {summary.get('output_dir', '?')} (sweep.md, one folder per cell)"))
