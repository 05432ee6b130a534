"""report.md renders every metric: headline, figures, protocol, options, details, failures."""

from __future__ import annotations

import re

from workbench.render.report_md import render_report_md

GIB = 1024**3


def _metric(evaluator, dataset, metric, dense, compressed, options=None, dense_details=None, comp_details=None, **extra):
    return {"evaluator": evaluator, "dataset": dataset, "metric": metric, "dense": dense, "compressed": compressed,
            "options": options or {}, "details": {"dense": dense_details, "compressed": comp_details}, **extra}


PPL_PROTOCOL = "600 non-overlapping windows of 512 tokens, 306,600 predicted tokens"
REPORT = {
    "profile_name": "all",
    "params": {"ratio_targeted": 0.2, "ratio_requested": 0.2, "ratio_model": 0.15},
    "metrics": [
        _metric("perplexity", "embedded:wiki-vital", "perplexity", 15.25, 19.5, {"seq_len": 512, "max_windows": 0},
                {"seq_len": 512, "windows": 600, "tokens": 306_600, "nll": 2.72, "protocol": PPL_PROTOCOL},
                {"seq_len": 512, "windows": 600, "tokens": 306_600, "nll": 2.97, "protocol": PPL_PROTOCOL}),
        _metric("throughput", "", "decode tokens/s", 100.0, 125.0, {"batch_size": 4},
                {"figures": {"prefill tokens/s": 2000.0}, "prefill_s": [0.5, 0.52], "threads": 2, "device": "cpu"},
                {"figures": {"prefill tokens/s": 2400.0}, "prefill_s": [0.42, 0.43], "threads": 2, "device": "cpu"}),
        _metric("memory", None, "parameter bytes", 2 * GIB, 1.5 * GIB, {},
                {"figures": {"peak RSS bytes (process so far)": 3 * GIB}, "decoder_linear": {"low_rank_modules": 0}},
                {"figures": {"peak RSS bytes (process so far)": 4 * GIB}, "decoder_linear": {"low_rank_modules": 210}}),
        _metric("lm-eval", "arc_easy, piqa", "average accuracy", 0.6, 0.55, {"tasks": ["arc_easy", "piqa"]},
                {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.45}, "piqa": {"acc": 0.7}},
                 "figures": {"arc_easy acc": 0.5, "piqa acc": 0.7}},
                {"tasks": {"arc_easy": {"acc": 0.45, "acc_norm": 0.4}, "piqa": {"acc": 0.65}},
                 "figures": {"arc_easy acc": 0.45, "piqa acc": 0.65}}),
        _metric("choice", "embedded:wiki-vital", "accuracy", 0.54, None, {"n": 200},
                {"questions": 200}, None, error="compressed: RuntimeError: boom | bang"),
    ],
    "timings": {"total_s": 12.0},
    "ranks": [],
}


def _row(text, *cells):
    pattern = r"^\|\s*" + r"\s*\|\s*".join(re.escape(c) for c in cells) + r"\s*\|"
    hits = [line for line in text.splitlines() if re.match(pattern, line)]
    assert hits, f"no row starting {cells} in:\n{text}"
    return hits[0]


def test_every_metric_and_figure_has_a_row():
    text = render_report_md(REPORT)
    _row(text, "perplexity", "embedded:wiki-vital", "perplexity", "15.25", "19.5", "×1.279")
    _row(text, "throughput", "", "decode tokens/s", "100", "125", "×1.250")
    _row(text, "throughput", "", "prefill tokens/s", "2000", "2400", "×1.200")
    _row(text, "memory", "", "parameter bytes", "2.0 GiB", "1.5 GiB", "×0.750")
    _row(text, "memory", "", "peak RSS bytes (process so far)", "3.0 GiB", "4.0 GiB")
    _row(text, "lm-eval", "arc_easy, piqa", "average accuracy", "0.6", "0.55")
    _row(text, "lm-eval", "", "piqa acc", "0.7", "0.65")
    assert "failed: compressed: RuntimeError: boom \\| bang" in _row(text, "choice", "embedded:wiki-vital", "accuracy", "0.54")


def test_details_state_the_protocol_options_and_values():
    text = render_report_md(REPORT)
    section = text.split("### perplexity (embedded:wiki-vital)")[1].split("###")[0]
    assert f"- protocol: {PPL_PROTOCOL}" in section
    assert "- options: seq_len = 512, max_windows = 0" in section
    _row(section, "windows", "600", "600")
    _row(section, "tokens", "306,600", "306,600")
    _row(section, "nll", "2.72", "2.97")
    lm = text.split("### lm-eval (arc_easy, piqa)")[1].split("###")[0]
    _row(lm, "tasks.arc_easy.acc_norm", "0.45", "0.4")
    assert "- options: tasks = arc_easy, piqa" in lm
    assert "figures" not in lm  # already in the metrics table
    _row(text.split("### throughput")[1], "prefill_s", "0.5, 0.52", "0.42, 0.43")
    _row(text.split("### memory")[1], "decoder_linear.low_rank_modules", "0", "210")
    choice = text.split("### choice (embedded:wiki-vital)")[1]
    assert "- failed: compressed: RuntimeError" in choice
    _row(choice, "questions", "200", "—")


def test_a_report_without_metrics_still_renders():
    text = render_report_md({"profile_name": "x", "metrics": []})
    assert "## Metrics" in text and "Evaluation details" not in text
