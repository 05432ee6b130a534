"""report.md: the run's report as a page a person reads.

Every metric is shown dense beside compressed: the headline value of each evaluator, the further
figures it lists in `details["figures"]`, and under "Evaluation details" its protocol, options
and every other detail (nested ones flattened to dotted names). A name containing "bytes" is
shown in KiB/MiB/GiB.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from workbench.render.numbers import format_bytes, format_change
from workbench.report import Metric, Report, load_report


def _num(value: Any, digits: int = 4, name: str = "") -> str:
    """One table cell: numbers to `digits` significant digits (bytes in binary units), text escaped."""
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


def _flatten(details: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in details.items():
        if not prefix and key in ("figures", "protocol"):
            continue  # shown in the metrics table and as the protocol line
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _metric_rows(metrics: list[Metric]) -> list[str]:
    rows = ["| evaluator | dataset | metric | dense | compressed | change |", "|---|---|---|---|---|---|"]
    for m in metrics:
        name = m.metric or ""
        shown = _num(m.compressed, name=name) if m.error is None else f"failed: {_num(m.error)}"
        change = format_change(m.dense, m.compressed, percent=False) if m.error is None else ""
        rows.append(f"| {_num(m.evaluator)} | {_num(m.dataset) if m.dataset else ''} | {_num(name)} | "
                    f"{_num(m.dense, name=name)} | {shown} | {change} |")
        dense_fig, comp_fig = m.figures("dense"), m.figures("compressed")
        for fig in dict.fromkeys([*dense_fig, *comp_fig]):
            d, c = dense_fig.get(fig), comp_fig.get(fig)
            rows.append(f"| {_num(m.evaluator)} | | {_num(fig)} | {_num(d, name=fig)} | {_num(c, name=fig)} | "
                        f"{format_change(d, c, percent=False)} |")
    return rows


def _detail_sections(metrics: list[Metric]) -> list[str]:
    lines = ["## Evaluation details"]
    for m in metrics:
        dense, compressed = m.side("dense"), m.side("compressed")
        title = f"{m.evaluator} ({m.dataset})" if m.dataset else f"{m.evaluator}"
        lines += ["", f"### {title}", ""]
        protocol = compressed.get("protocol") or dense.get("protocol")
        if protocol:
            lines.append(f"- protocol: {protocol}")
        if m.options:
            lines.append("- options: " + ", ".join(f"{k} = {_num(v)}" for k, v in m.options.items()))
        if m.error is not None:
            lines.append(f"- failed: {_num(m.error)}")
        d_flat, c_flat = dict(_flatten(dense)), dict(_flatten(compressed))
        keys = list(dict.fromkeys([*d_flat, *c_flat]))
        if keys:
            lines += ([""] if lines[-1] else []) + ["| detail | dense | compressed |", "|---|---|---|"]
            lines += [f"| {k} | {_num(d_flat.get(k), name=k)} | {_num(c_flat.get(k), name=k)} |" for k in keys]
    return lines


def _whitening_lines(entries: list[Mapping[str, Any]]) -> list[str]:
    """Which groups left the Cholesky route and why: a user judging the result needs to see it."""
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


def compensation_text(section: Mapping[str, Any] | None) -> str | None:
    """One line on the compensate stage (options, what changed, objective, time); None when it did not run."""
    if not section:
        return None
    sites = [s for s in section.get("sites") or [] if isinstance(s, Mapping)]
    changed = sum(bool(s.get("updated") or s.get("refactored")) for s in sites)
    holdout = section.get("holdout")
    choice = (f"ridge from {_num(section.get('ridge'))}, chosen on {_num(holdout)} of the windows held out"
              if holdout else f"ridge {_num(section.get('ridge'))}")
    text = (f"sequential = {_num(section.get('sequential'))}, update = {_num(section.get('update'))} "
            f"({choice}): {changed} of {len(sites)} sites changed")
    for label, first, last in (("calibration objective", "objective_before", "objective_after"),
                               ("held-out objective", "held_out_before", "held_out_after")):
        before, after = section.get(first), section.get(last)
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            text += f", {label} {_num(float(before))} → {_num(float(after))}"
            if before:
                text += f" ({100 * (after - before) / before:+.1f}%)"
    seconds = section.get("time_s")
    if isinstance(seconds, (int, float)):
        text += f", {seconds:.1f} s"
    return text


def _compensation_lines(section: Mapping[str, Any] | None) -> list[str]:
    text = compensation_text(section)
    if text is None:
        return []
    return [f"- compensation: {text}", *(f"  - {_num(n)}" for n in section.get("notes") or [])]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def recovery_text(section: Mapping[str, Any] | None) -> str | None:
    """One line on the recover stage (settings, loss first → last, what trained, time); None when it did not run."""
    if not section:
        return None
    targets = section.get("targets")
    targets = "+".join(str(t) for t in targets) if isinstance(targets, list) else _num(targets)
    text = (f"{_num(section.get('method'))} rank {_num(section.get('rank'))} (alpha {_num(section.get('alpha'))}) on "
            f"{targets}, {_num(section.get('steps'))} steps of {_num(section.get('batch_size'))} × "
            f"{_num(section.get('seq_len'))} tokens of {_num(section.get('dataset'))}, lr {_num(section.get('lr'))}")
    first, last = _number(section.get("loss_first")), _number(section.get("loss_last"))
    if first is not None and last is not None:
        text += f": loss {first:.4g} → {last:.4g}"
    trained = section.get("trained_parameters")
    if isinstance(trained, int):
        text += f", {trained:,} adapter parameters merged into the factors"
    seconds = _number(section.get("time_s"))
    if seconds is not None:
        text += f", {seconds:.1f} s"
    return text


def loss_curve(losses: Any, points: int = 10) -> list[tuple[int, float]]:
    """(step, loss) at about `points` evenly spaced steps, the first and last included."""
    values = [float(x) for x in losses if _number(x) is not None] if isinstance(losses, list) else []
    if not values:
        return []
    steps = sorted({round(i * (len(values) - 1) / max(1, points - 1)) for i in range(points)})
    return [(i + 1, values[i]) for i in steps]


def _recovery_lines(section: Mapping[str, Any] | None) -> list[str]:
    text = recovery_text(section)
    if text is None:
        return []
    lines = [f"- recovery: {text}"]
    curve = loss_curve(section.get("losses"))
    if len(curve) > 2:
        lines.append("  - loss by step: " + ", ".join(f"{step}: {loss:.4g}" for step, loss in curve))
    return lines + [f"  - {_num(n)}" for n in section.get("notes") or []]


def _percent(ratio: float | None) -> str:
    return "—" if ratio is None else f"{100 * ratio:.2f}%"


def _signal_lines(signals: Mapping[str, Any] | None) -> list[str]:
    """One line per signal the allocator used: what its notes say it did (else its options)."""
    lines = []
    for name, entry in (signals or {}).items():
        entry = entry if isinstance(entry, Mapping) else {}
        said = entry.get("notes") or entry.get("options") or {}
        shown = ", ".join(f"{_num(k)} {_num(v)}" for k, v in said.items()) if isinstance(said, Mapping) else ""
        lines.append(f"- signal {_num(name)}" + (f": {shown}" if shown else ""))
    return lines


def render_report_md(report: Report | Mapping[str, Any]) -> str:
    """report.md for a report (a `Report`, or report.json's contents from any format)."""
    r = load_report(report)
    p, model, calibration = r.params, r.model, r.calibration
    lines = [f"# workbench run: {r.profile_name or '?'}", ""]
    lines += [f"- model: `{model.source}` (adapter {model.adapter}, {model.device}, {model.dtype})",
              f"- allocator: {r.allocator.name}", *_signal_lines(r.signals),
              f"- calibration: {_num(calibration.windows)} × {_num(calibration.seq_len)} tokens",
              f"- removed: {_percent(p.ratio_targeted)} of targeted parameters "
              f"(requested {_percent(p.ratio_requested)}), {_percent(p.ratio_model)} of the whole model",
              *_whitening_lines(r.whitening), *_compensation_lines(r.compensation),
              *_recovery_lines(r.recovery)]
    if r.notes:  # a report from a hand edit or a damaged file: say what could not be shown
        lines += ["- left out of this report (unreadable in report.json): " + "; ".join(_num(n) for n in r.notes)]
    lines += ["", "## Metrics", ""]
    lines += _metric_rows(r.metrics)
    if r.metrics:
        lines += ["", *_detail_sections(r.metrics)]
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {_num(k)} | {v:.1f} |" for k, v in r.timings.items()]
    lines += ["", "## Ranks", "", "| group | in | out | rank | max useful | dense | effective rank |", "|---|---|---|---|---|---|---|"]
    for row in r.ranks:
        lines.append(f"| {_num(row.group)} | {_num(row.in_features)} | {_num(row.out_features)} | {_num(row.rank)} | "
                     f"{_num(row.max_rank)} | {_num(row.dense)} | {_num(row.effective_rank)} |")
    return "\n".join(lines) + "\n"
