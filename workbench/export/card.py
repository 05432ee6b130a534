"""The model card (README.md) of an export: what was done to the model, how well it held up, how to load it.

Everything comes from the run's report.json and profile.toml; a field the report lacks (an older
or edited run) reads "not recorded" rather than failing the export.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

from workbench import __version__

from workbench.export.run_files import SavedRun

UNKNOWN = "not recorded"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _safely(build: Callable[[], list[str]]) -> list[str]:
    """A section, or one line saying it is not recorded when the report lacks (or garbles) its fields."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError):
        return [UNKNOWN]


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f}%"


def method(run: SavedRun) -> str:
    sizes = {len(g["modules"]) for g in run.groups}
    if sizes and max(sizes) > 1:
        return ("Basis Sharing (whitened low-rank SVD; consecutive layers of one matrix type share one basis, "
                f"groups of up to {max(sizes)} layers)")
    return "SVD-LLM (whitened low-rank SVD; one basis per matrix)"


def _summary(run: SavedRun, dense_export: bool) -> list[str]:
    report = run.report
    rows = [("method", method(run)), ("architecture", f"{run.family} ({run.config.get('num_hidden_layers', '?')} layers)"),
            ("source model", report.get("model", {}).get("source", UNKNOWN))]

    def allocator() -> str:
        info = report["allocator"]
        options = ", ".join(f"{k}={v}" for k, v in (info.get("options") or {}).items())
        return info["name"] + (f" ({options})" if options else "")

    def ratio() -> str:
        p = report["params"]
        return (f"{_percent(p['ratio_targeted'])} of the targeted linear layers' parameters removed "
                f"(requested {_percent(p['ratio_requested'])})")

    def whole() -> str:
        p = report["params"]
        return f"{_percent(p['ratio_model'])} removed: {p['model_dense']:,} → {p['model_compressed']:,} parameters"

    for label, build in (("allocator", allocator), ("ratio, targeted layers", ratio), ("ratio, whole model", whole)):
        rows.append((label, _safely(lambda: [build()])[0]))
    if dense_export:
        rows.append(("this folder", "the low-rank factors multiplied back into full weights: the standard "
                                    "architecture, no smaller than the original model"))
    rows.append(("workbench", __version__))
    return ["| | |", "|---|---|"] + [f"| {label} | {_cell(value)} |" for label, value in rows]


def _ranks(run: SavedRun) -> list[str]:
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in run.report["ranks"]:
        by_type.setdefault(entry["type"], []).append(entry)
    lines = ["| matrix type | groups | layers per group | rank min / median / max | groups kept dense |",
             "|---|---:|---:|---|---:|"]
    for kind, entries in by_type.items():
        ranks = [e["rank"] for e in entries if not e["dense"]]
        spread = f"{min(ranks)} / {statistics.median(ranks):g} / {max(ranks)}" if ranks else "–"
        lines.append(f"| {_cell(kind)} | {len(entries)} | {len(entries[0]['layers'])} | {spread} | "
                     f"{sum(bool(e['dense']) for e in entries)} |")
    return lines


def _metrics(run: SavedRun) -> list[str]:
    rows = run.report["metrics"]
    if not rows:
        return ["No evaluator ran."]
    lines = ["| metric | data | dense | compressed |", "|---|---|---:|---:|"]
    for m in rows:
        shown = [f"{v:.4g}" if isinstance(v, (int, float)) else _cell(v) for v in (m.get("dense"), m.get("compressed"))]
        label = m["metric"] if m["metric"] == m["evaluator"] else f"{m['evaluator']}: {m['metric']}"
        lines.append(f"| {_cell(label)} | {_cell(m.get('dataset') or '')} | "
                     f"{shown[0]} | {shown[1]} |")
    return lines


def _loading(dense_export: bool) -> list[str]:
    if dense_export:
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```"]
    return ["The low-rank layers are defined in `modeling_lowrank.py` (torch and transformers only), which",
            "transformers runs only when asked to with `trust_remote_code=True`; read it first.", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            'ids = tokenizer("The capital of France is", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**ids, max_new_tokens=20, do_sample=False)[0]))", "```"]


def model_card(run: SavedRun, dense_export: bool = False) -> str:
    name = run.report.get("profile_name") or (run.run_dir.name if run.run_dir else run.model_dir.name)
    tags = ["workbench", "low-rank", "svd", "compressed"]
    lines = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {_cell(name)}: compressed with workbench", "",
             "A causal language model whose linear layers were compressed with whitened low-rank SVD by "
             "workbench (" + ("dense export" if dense_export else "low-rank export") + ").",
             "", *_summary(run, dense_export), "", "## Ranks", "", *_safely(lambda: _ranks(run)), "",
             "## Metrics, dense → compressed", "", *_safely(lambda: _metrics(run)), "", "## Loading", "",
             *_loading(dense_export), ""]
    if run.profile_text.strip():
        lines += ["## Resolved profile", "", "```toml", run.profile_text.strip().replace("```", "'''"), "```", ""]
    return "\n".join(lines)
