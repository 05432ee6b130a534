"""report.md: the run's report as a page a person reads.

Every metric is shown dense beside compressed: the headline value of each evaluator, the further
figures it lists in `details["figures"]`, and under "Evaluation details" its protocol, options
and every other detail (nested ones flattened to dotted names). A name containing "bytes" is
shown in KiB/MiB/GiB.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from workbench.render.display import format_bytes


def _num(value: Any, digits: int = 4, name: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if "bytes" in name and isinstance(value, (int, float)):
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_num(v, digits) for v in value) if len(value) <= 8 else f"{len(value)} values"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _change(dense: Any, compressed: Any) -> str:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (dense, compressed)) or not dense:
        return ""
    return f"×{compressed / dense:.3f}"


def _details(metric: Mapping[str, Any], label: str) -> dict[str, Any]:
    details = (metric.get("details") or {}).get(label)
    return details if isinstance(details, Mapping) else {}


def _flatten(details: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in details.items():
        if not prefix and key in ("figures", "protocol"):
            continue  # shown in the metrics table and as the protocol line
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _metric_rows(metrics: list[Mapping[str, Any]]) -> list[str]:
    rows = ["| evaluator | dataset | metric | dense | compressed | change |", "|---|---|---|---|---|---|"]
    for m in metrics:
        name = m.get("metric") or ""
        dense, compressed = m.get("dense"), m.get("compressed")
        shown = _num(compressed, name=name) if "error" not in m else f"failed: {_num(m['error'])}"
        change = _change(dense, compressed) if "error" not in m else ""
        rows.append(f"| {m.get('evaluator')} | {_num(m.get('dataset')) if m.get('dataset') else ''} | {name} | {_num(dense, name=name)} | "
                    f"{shown} | {change} |")
        dense_fig = _details(m, "dense").get("figures") or {}
        comp_fig = _details(m, "compressed").get("figures") or {}
        for fig in dict.fromkeys([*dense_fig, *comp_fig]):
            d, c = dense_fig.get(fig), comp_fig.get(fig)
            rows.append(f"| {m.get('evaluator')} | | {fig} | {_num(d, name=fig)} | {_num(c, name=fig)} | {_change(d, c)} |")
    return rows


def _detail_sections(metrics: list[Mapping[str, Any]]) -> list[str]:
    lines = ["## Evaluation details"]
    for m in metrics:
        dense, compressed = _details(m, "dense"), _details(m, "compressed")
        title = f"{m.get('evaluator')} ({m['dataset']})" if m.get("dataset") else f"{m.get('evaluator')}"
        lines += ["", f"### {title}", ""]
        protocol = compressed.get("protocol") or dense.get("protocol")
        if protocol:
            lines.append(f"- protocol: {protocol}")
        options = m.get("options") or {}
        if options:
            lines.append("- options: " + ", ".join(f"{k} = {_num(v)}" for k, v in options.items()))
        if "error" in m:
            lines.append(f"- failed: {_num(m['error'])}")
        d_flat, c_flat = dict(_flatten(dense)), dict(_flatten(compressed))
        keys = list(dict.fromkeys([*d_flat, *c_flat]))
        if keys:
            lines += ([""] if lines[-1] else []) + ["| detail | dense | compressed |", "|---|---|---|"]
            lines += [f"| {k} | {_num(d_flat.get(k), name=k)} | {_num(c_flat.get(k), name=k)} |" for k in keys]
    return lines


def _whitening_lines(entries: list[Mapping[str, Any]]) -> list[str]:
    """Which groups left the Cholesky route and why: a user judging the result needs to see it."""
    entries = [e for e in entries if isinstance(e, Mapping)]
    if not entries:
        return []
    fell = [e for e in entries if e.get("fallback")]
    methods = [str(e.get("method")) for e in entries]
    line = "- whitening: " + ", ".join(f"{methods.count(m)} of {len(entries)} groups by {m}" for m in dict.fromkeys(methods))
    if not fell:
        return [line]
    lines = [line + f"; {len(fell)} fell back to the eigendecomposition (singular or ill-conditioned Gram):"]
    lines += [f"  - {e.get('group')}: rank of the Gram {e.get('rank_of_gram')}; {_num(e.get('fallback'))}" for e in fell]
    return lines


def render_report_md(report: dict[str, Any]) -> str:
    params = report.get("params", {})
    lines = [f"# workbench run: {report.get('profile_name', '?')}", ""]
    model = report.get("model", {})
    lines += [f"- model: `{model.get('source')}` (adapter {model.get('adapter')}, {model.get('device')}, {model.get('dtype')})",
              f"- allocator: {report.get('allocator', {}).get('name')}",
              f"- calibration: {report.get('calibration', {}).get('windows')} × {report.get('calibration', {}).get('seq_len')} tokens",
              f"- removed: {100 * params.get('ratio_targeted', 0):.2f}% of targeted parameters "
              f"(requested {100 * params.get('ratio_requested', 0):.2f}%), {100 * params.get('ratio_model', 0):.2f}% of the whole model",
              *_whitening_lines(report.get("whitening") or []),
              "", "## Metrics", ""]
    metrics = [m for m in report.get("metrics", []) if isinstance(m, Mapping)]
    lines += _metric_rows(metrics)
    if metrics:
        lines += ["", *_detail_sections(metrics)]
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.get("timings", {}).items()]
    lines += ["", "## Ranks", "", "| group | in | out | rank | max useful | dense | effective rank |", "|---|---|---|---|---|---|---|"]
    for r in report.get("ranks", []):
        lines.append(f"| {r['group']} | {r['in']} | {r['out']} | {r['rank']} | {r['max_rank']} | {r['dense']} | {r['effective_rank']} |")
    return "\n".join(lines) + "\n"
