"""report.json's schema: the pipeline's keys written back unchanged, old and hand-damaged reports still open."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from workbench.render.display import print_summary
from workbench.render.report_md import render_report_md
from workbench.report import FORMAT, Report, ReportError, build_report, load_report
from workbench.tui.run_state import describe_result
from workbench.tui.runs_index import comparison_rows, scan_runs

V1 = Path(__file__).parent / "data" / "report_v1.json"  # written by the pipeline before `format` existed


def v1() -> dict:
    return json.loads(V1.read_text(encoding="utf-8"))


def summary_text(report) -> str:
    console = Console(record=True, width=120, color_system=None, file=io.StringIO())
    print_summary(console, report)
    return console.export_text()


def test_an_old_report_reads_as_format_1_with_every_field():
    report = load_report(V1)
    assert report.format == 1 and report.notes == []
    assert report.profile_name == "tiny" and report.allocator.name == "loss-aware"
    assert report.params.ratio_targeted == 0.5 and report.params.model_dense == 164416
    assert [m.evaluator for m in report.metrics] == ["perplexity", "throughput", "memory", "choice"]
    ppl = report.metrics[0]
    assert (ppl.dense, ppl.compressed) == (pytest.approx(129.2965, rel=1e-6), pytest.approx(129.1505, rel=1e-6))
    assert report.metrics[1].figures("dense")["prefill tokens/s"] > 0
    assert len(report.ranks) == 28 and report.ranks[0].in_features == 64 and report.ranks[0].layers == [0]
    assert report.timings["total_s"] == 0.426 and report.timings["compress_s"] == 0.171
    assert report.peak_memory.rss_bytes == 591003648 and report.peak_memory.cuda_bytes is None
    assert report.profile["compression"]["allocator"] == "loss-aware"


def test_writing_back_keeps_every_key_in_order_and_adds_format():
    data = v1()
    written = build_report(**data).to_dict()
    assert written.pop("format") == FORMAT == 2
    assert json.dumps(written) == json.dumps(data)  # same keys, same order, same values
    assert list(load_report(v1()).to_dict())[0] == "format"


def test_a_fresh_report_round_trips():
    report = build_report(**v1(), resumed_from_checkpoint=["calibrate"])
    again = load_report(json.loads(json.dumps(report.to_dict())))
    assert again == report and again.format == FORMAT and again.notes == []


def test_unknown_keys_are_kept_and_a_newer_format_is_noted():
    data = v1() | {"format": FORMAT + 1, "future_field": {"x": 1}}
    data["metrics"][0]["calibrated"] = True
    report = load_report(data)
    assert report.extra == {"future_field": {"x": 1}} and report.metrics[0].extra == {"calibrated": True}
    assert any("newer" in n for n in report.notes)
    assert report.to_dict()["future_field"] == {"x": 1} and report.to_dict()["metrics"][0]["calibrated"] is True


def test_an_old_report_opens_in_the_results_index_report_md_and_the_cli_summary(tmp_path):
    run = tmp_path / "old-run"
    run.mkdir()
    shutil.copy(V1, run / "report.json")
    runs = scan_runs(tmp_path)
    assert len(runs) == 1 and runs[0].profile == "tiny" and runs[0].allocator == "loss-aware"
    assert runs[0].ratio == "0.500" and runs[0].perplexity == "129.3 → 129.2" and runs[0].time == "0.4 s"
    rows = dict(comparison_rows(runs))
    assert rows["accuracy (embedded:wiki-vital)"] == ["0.25 → 0.375"] and rows["group size"] == ["1"]

    text = render_report_md(load_report(run / "report.json"))
    assert "# workbench run: tiny" in text and "| perplexity | /home/user/corpus.txt | perplexity | 129.3 | 129.2 | ×0.999 |" in text
    assert "| q_proj@0 | 64 | 64 |" in text and "left out" not in text

    shown = summary_text(v1())
    assert "perplexity (/home/user/corpus.txt)" in shown and "129.30" in shown and "50.0% removed" in shown
    assert "peak memory (RSS)" in shown and "563.6 MiB" in shown and "left out" not in shown
    assert describe_result(v1()).startswith("saved to /home/user/out; perplexity: 129.3 → 129.2")


def damaged() -> dict:
    """A report edited by hand: wrong types where numbers, tables and lists belong."""
    data = v1()
    data["params"]["ratio_targeted"] = "forty percent"
    data["params"]["model_dense"] = True
    data["metrics"][0]["dense"] = "129"
    data["metrics"][1] = "not a metric"
    data["metrics"][2]["details"] = [1, 2]
    data["ranks"][0]["in"] = None
    data["ranks"][1]["layers"] = "0-1"
    data["ranks"][2] = 7
    data["timings"]["calibrate"] = "slow"
    data["peak_memory"] = "a lot"
    data["model"] = ["llama"]
    data["format"] = "two"
    return data


def test_a_damaged_report_reads_with_notes_and_never_raises():
    report = load_report(damaged())
    assert report.params.ratio_targeted is None and report.params.model_dense is None
    assert report.params.ratio_model == pytest.approx(0.448423511)  # what was fine is kept
    assert len(report.metrics) == 3 and report.metrics[0].dense is None and report.metrics[1].details == {}
    assert len(report.ranks) == 27 and report.ranks[0].in_features is None and report.ranks[1].layers == []
    assert "calibrate" not in report.timings and report.timings["total_s"] == 0.426
    assert report.peak_memory.rss_bytes is None and report.model.source is None and report.format == 1
    notes = "\n".join(report.notes)
    for where in ("params.ratio_targeted", "params.model_dense", "metrics[0].dense", "metrics: 1 entries",
                  "metrics[1].details", "ranks[1].layers", "ranks: 1 entries", "timings.calibrate", "peak_memory",
                  "model: expected a table", "format"):
        assert where in notes, (where, notes)


def test_a_damaged_report_opens_everywhere(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text(json.dumps(damaged()))
    runs = scan_runs(tmp_path)
    # ratio_targeted is unreadable: the index shows the requested ratio instead
    assert runs[0].ratio == "0.500" and runs[0].perplexity == "? → 129.2"
    text = render_report_md(runs[0].report)
    assert "removed: — of targeted parameters" in text and "left out of this report" in text
    shown = summary_text(damaged())
    assert "left out (unreadable in report.json)" in shown and "params.ratio_targeted" in shown


@pytest.mark.parametrize("content", [None, "{ cut short", "[1, 2]", b"\xff\xfe"])
def test_a_file_that_holds_no_report_is_refused_by_name(tmp_path, content):
    path = tmp_path / "report.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ReportError) as caught:
        load_report(path)
    assert str(path) in str(caught.value) and caught.value.exit_code == 2
    (tmp_path / "run").mkdir()
    if path.exists():
        shutil.copy(path, tmp_path / "run" / "report.json")
    assert scan_runs(tmp_path) == []  # the app's index skips it


def test_an_empty_report_renders_placeholders():
    report = Report()
    assert report.to_dict()["format"] == FORMAT and "left out" not in summary_text(report)
    assert render_report_md({}).startswith("# workbench run: ?")
