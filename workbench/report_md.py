"""report.md: the run's report as a page a person reads."""

from __future__ import annotations

from typing import Any


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_report_md(report: dict[str, Any]) -> str:
    params = report.get("params", {})
    lines = [f"# workbench run: {report.get('profile_name', '?')}", ""]
    model = report.get("model", {})
    lines += [f"- model: `{model.get('source')}` (adapter {model.get('adapter')}, {model.get('device')}, {model.get('dtype')})",
              f"- allocator: {report.get('allocator', {}).get('name')}",
              f"- calibration: {report.get('calibration', {}).get('windows')} × {report.get('calibration', {}).get('seq_len')} tokens",
              f"- removed: {100 * params.get('ratio_targeted', 0):.2f}% of targeted parameters "
              f"(requested {100 * params.get('ratio_requested', 0):.2f}%), {100 * params.get('ratio_model', 0):.2f}% of the whole model",
              "", "## Metrics", "", "| evaluator | dataset | metric | dense | compressed |", "|---|---|---|---|---|"]
    for m in report.get("metrics", []):
        compressed = _num(m.get("compressed")) if "error" not in m else f"failed: {m['error']}"
        lines.append(f"| {m.get('evaluator')} | {m.get('dataset')} | {m.get('metric')} | {_num(m.get('dense'))} | {compressed} |")
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.get("timings", {}).items()]
    lines += ["", "## Ranks", "", "| group | in | out | rank | max useful | dense | effective rank |", "|---|---|---|---|---|---|---|"]
    for r in report.get("ranks", []):
        lines.append(f"| {r['group']} | {r['in']} | {r['out']} | {r['rank']} | {r['max_rank']} | {r['dense']} | {r['effective_rank']} |")
    return "\n".join(lines) + "\n"
