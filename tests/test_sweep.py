"""Sweeps: `[sweep]` parsing and validation, one calibration for many cells, per-cell resume, the table and plot."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_profile
from workbench.cli import app
from workbench.errors import Interrupted, ProfileError, RunFailed
from workbench.events import CancelToken, EventBus
from workbench.profile.schema import parse_profile
from workbench.profile.sweep import cell_profile
from workbench.run.pipeline import run
from workbench.storage import checkpoint
from workbench.storage.checkpoint import work_dir_for

runner = CliRunner()

SWEEP = '[signals.fisher]\nwindows = 2\n[sweep]\nratio = [0.3, 0.5]\nallocator = ["uniform", "loss-aware"]\n'
CELLS = ["0.3-uniform", "0.3-loss-aware", "0.5-uniform", "0.5-loss-aware"]


@pytest.fixture(autouse=True)
def _checkpoint_every_layer(monkeypatch):
    monkeypatch.setattr(checkpoint, "COMMIT_SPACING", 0.0)


def _text(root, out, sweep=SWEEP):
    return tiny_profile(root, out, ratio=0.3, extra=sweep)


def _problems(text: str) -> list:
    with pytest.raises(ProfileError) as caught:
        parse_profile(text)
    return caught.value.problems


def _cell_result(folder):
    report = json.loads((folder / "report.json").read_text())
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "model").rglob("*"))
             if p.is_file()}
    return report["ranks"], [(m["dense"], m["compressed"]) for m in report["metrics"]], files


def _recorder():
    events = []
    return events, EventBus([events.append])


# ---------------------------------------------------------------------------------- the profile


def test_sweep_cells_are_every_combination_ratio_outermost():
    profile = parse_profile('[compression]\nallocator = "drank-rebalanced"\n[compression.allocator_options]\n'
                            'beta = 0.2\n[sweep]\nratio = [0.2, 0.4]\nallocator = ["uniform", "drank-rebalanced", '
                            '{name = "drank-rebalanced", beta = 0.5}, {name = "drank", label = "d"}]\n'
                            'update = ["none", "closed-form"]\n')
    cells = profile.sweep.cells()
    assert len(cells) == 2 * 4 * 2
    assert [c.name for c in cells[:4]] == ["0.2-uniform", "0.2-uniform-closed-form", "0.2-drank-rebalanced",
                                           "0.2-drank-rebalanced-closed-form"]
    assert cells[-1].name == "0.4-d-closed-form"
    by_label = {a.label: a for a in profile.sweep.allocators}
    # a name alone: the [compression] allocator keeps its [compression.allocator_options]; a table: its own
    assert by_label["drank-rebalanced"].options["beta"] == 0.2
    assert by_label["drank-rebalanced-beta0.5"].options["beta"] == 0.5
    assert by_label["uniform"].options == {}
    assert {c.sequential for c in cells} == {False}  # not swept: the [compression] value


def test_sweep_round_trips_through_the_resolved_profile():
    profile = parse_profile('[sweep]\nratio = [0.2, 0.3]\nallocator = ["uniform", {name = "drank-rebalanced", '
                            'beta = 0.5, label = "drank-b0.5"}]\nsequential = [false, true]\n')
    again = parse_profile(profile.to_toml())
    assert again.sweep == profile.sweep and again.sweep.cells() == profile.sweep.cells()


def test_signals_of_every_swept_allocator_are_resolved_once():
    profile = parse_profile('[compression]\nallocator = "uniform"\n[sweep]\nallocator = ["uniform", "loss-aware"]\n')
    assert profile.sweep.needed_signals(_registry()) == ("fisher",)
    assert "fisher" in profile.signals and profile.signals["fisher"]["windows"] >= 1


def _registry():
    from workbench.registry import get_registry

    return get_registry()


def test_cell_profile_runs_the_cell_alone():
    profile = parse_profile('[sweep]\nratio = [0.4]\nallocator = [{name = "drank-rebalanced", beta = 0.5, '
                            'label = "b"}]\n', file="profiles/s.toml")
    cell = profile.sweep.cells()[0]
    alone = cell_profile(profile, cell, "runs/s")
    c = alone.compression
    assert (c.ratio, c.allocator, c.allocator_options["beta"]) == (0.4, "drank-rebalanced", 0.5)
    assert alone.sweep is None and alone.output.dir == "runs/s/0.4-b"
    assert parse_profile(alone.to_toml()).compression == c  # its profile.toml runs it again


@pytest.mark.parametrize("sweep,key,message,suggestion", [
    ("ratio = [0.2, 1.5]", "sweep.ratio[1]", "outside [0, 1)", None),
    ("ratio = [0.2, 0.2]", "sweep.ratio[1]", "listed twice", None),
    ("ratio = 0.2", "sweep.ratio", "non-empty list", None),
    ("ratio = []", "sweep.ratio", "empty list", None),
    ('allocator = ["unifrom"]', "sweep.allocator[0]", "unknown allocator 'unifrom'", "uniform"),
    ('allocator = [{name = "drank-rebalanced", beta = 2.0}]', "sweep.allocator[0].beta", "maximum", None),
    ('allocator = [{name = "drank", bogus = 1}]', "sweep.allocator[0].bogus", "unknown option", None),
    ('allocator = [{beta = 0.2}]', "sweep.allocator[0].name", "missing", None),
    ('allocator = [{name = "drank", label = "../x"}]', "sweep.allocator[0].label", "cannot name a folder", None),
    ('allocator = ["drank", {name = "uniform", label = "drank"}]', "sweep.allocator[1]", "label 'drank'", None),
    ('update = ["none", "closed"]', "sweep.update[1]", "not one of the choices", "closed-form"),
    ("sequential = [true, 1]", "sweep.sequential[1]", "", None),
    ("group_size = [1, 2]", "sweep.group_size", "cannot be swept", None),
    ("ratoi = [0.2]", "sweep.ratoi", "unknown key", "ratio"),
])
def test_bad_sweep_values_are_named_with_their_line(sweep, key, message, suggestion):
    problems = _problems(f'name = "x"\n[sweep]\n{sweep}\n')
    hit = next((p for p in problems if p.key == key), None)
    assert hit is not None, [str(p) for p in problems]
    assert message in hit.message and hit.line == 3
    assert hit.suggestion == suggestion


def test_a_signal_trained_toward_one_ratio_is_not_shared_across_ratios():
    from types import SimpleNamespace

    real = _registry()
    registry = SimpleNamespace(
        allocators={**real.allocators, "trained": SimpleNamespace(name="trained", options=(), needs=("mask",))},
        evaluators=real.evaluators,
        signals={**real.signals, "mask": SimpleNamespace(name="mask", options=(), depends_on_target=True)})
    text = '[sweep]\nratio = [0.2, 0.4]\nallocator = ["uniform", "trained"]\n'
    with pytest.raises(ProfileError) as caught:
        parse_profile(text, registry=registry)
    [problem] = caught.value.problems
    assert problem.key == "sweep.ratio" and "'mask' (needed by trained)" in problem.message
    assert parse_profile(text.replace("[0.2, 0.4]", "[0.4]"), registry=registry).sweep.ratios == (0.4,)


def test_empty_or_misplaced_sweep_is_refused():
    assert [p.key for p in _problems("[sweep]\n")] == ["sweep"]
    assert [p.key for p in _problems("sweep = 3\n")] == ["sweep"]


# ---------------------------------------------------------------------------------- running it


@pytest.fixture(scope="module")
def reference(tiny_workspace, tmp_path_factory):
    """The uninterrupted sweep, and its events. Module-scoped fixtures run before the autouse cache
    isolation: isolate here."""
    out = tmp_path_factory.mktemp("reference") / "out"
    events, bus = _recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_DENSE_CACHE", str(tmp_path_factory.mktemp("dense")))
        mp.setattr(checkpoint, "COMMIT_SPACING", 0.0)
        summary = run(parse_profile(_text(tiny_workspace, out)), events=bus)
    return out, summary, events


def test_sweep_calibrates_once_and_writes_every_cell(reference):
    out, summary, events = reference
    starts = [e.stage for e in events if e.kind == "stage_start"]
    assert starts.count("calibrate") == 1 and starts.count("sensitivity") == 1 and starts.count("evaluate dense") == 1
    assert starts.count("allocate") == len(CELLS) and starts.count("evaluate compressed") == len(CELLS)
    assert [r["cell"] for r in summary["cells"]] == CELLS
    assert sorted(p.name for p in out.iterdir()) == sorted([*CELLS, ".workbench-output", "profile.toml", "sweep.json",
                                                            "sweep.md"])
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(summary, default=str))
    for row in summary["cells"]:
        report = json.loads((out / row["cell"] / "report.json").read_text())
        assert report["params"]["ratio_requested"] == row["ratio"]
        assert abs(report["params"]["ratio_targeted"] - row["ratio"]) < 0.05
        assert report["allocator"]["name"] == row["allocator"]
        assert report["sweep"]["cell"] == row["cell"]
        assert (out / row["cell"] / "report.md").is_file() and (out / row["cell"] / "model").is_dir()
        assert row["metrics"][0]["dense"] == summary["dense"][0]["dense"]
    # more removed, fewer parameters kept
    kept = {r["cell"]: r["params_model"] for r in summary["cells"]}
    assert kept["0.5-uniform"] < kept["0.3-uniform"]
    assert set(summary["timings"]["shared"]) == {"load", "evaluate dense", "calibrate", "sensitivity"}
    assert summary["failed"] == []
    assert not work_dir_for(out).exists()


def test_a_cell_equals_the_same_cell_run_alone(reference, tiny_workspace, tmp_path):
    """Cell 2 comes after cell 1 assembled and was put back: the model was dense again in between."""
    out, summary, _ = reference
    profile = parse_profile(_text(tiny_workspace, out))
    cell = profile.sweep.cells()[1]
    alone = tmp_path / "alone"
    run(cell_profile(profile, cell, tmp_path), output_dir=alone)
    assert _cell_result(out / cell.name) == _cell_result(alone)  # ranks, metrics, every model file byte


def test_a_cell_loads_like_a_run(reference):
    import workbench
    from workbench.engine.lowrank import LowRankLinear

    out, _, _ = reference
    model = workbench.load_compressed(out / "0.5-loss-aware")
    assert any(isinstance(m, LowRankLinear) for m in model.modules())


def test_interrupted_sweep_resumes_at_the_next_cell(reference, tiny_workspace, tmp_path):
    out = tmp_path / "out"
    profile = parse_profile(_text(tiny_workspace, out))
    cancel = CancelToken()

    def stop_after_first_cell(event):
        if event.stage == "sweep" and event.kind == "progress" and event.current == 1:
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted) as caught:
        run(profile, events=EventBus([stop_after_first_cell]), cancel=cancel)
    work = work_dir_for(out)
    assert not out.exists() and caught.value.checkpoint == work  # nothing published, progress kept
    assert not [p for p in work.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]

    events, bus = _recorder()
    summary = run(profile, resume=True, events=bus)
    starts = [e.stage for e in events if e.kind == "stage_start"]
    assert "calibrate" in starts and starts.count("allocate") == len(CELLS) - 1  # cell 1 not recomputed
    assert not any(e.message == f"cell {CELLS[0]}" for e in events)
    assert "1 of 4 sweep cells" in summary["resumed_from_checkpoint"]
    assert any(r.startswith("calibration") for r in summary["resumed_from_checkpoint"])
    assert [r.get("resumed", False) for r in summary["cells"]] == [True, False, False, False]
    ref_out = reference[0]
    for name in CELLS:
        assert _cell_result(out / name) == _cell_result(ref_out / name)
    assert not work.exists()


def test_a_failing_cell_leaves_the_others(tiny_workspace, tmp_path, monkeypatch):
    from workbench.run import stages

    original = stages.Allocate.run

    def allocate(self, ctx):
        if ctx.profile.compression.ratio == 0.5 and ctx.profile.compression.allocator == "uniform":
            raise RuntimeError("boom")
        original(self, ctx)

    monkeypatch.setattr(stages.Allocate, "run", allocate)
    out = tmp_path / "out"
    with pytest.raises(RunFailed, match="0.5-uniform"):
        run(parse_profile(_text(tiny_workspace, out, SWEEP.replace('"uniform", "loss-aware"', '"uniform"'))))
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["failed"] == ["0.5-uniform"] and "boom" in summary["cells"][1]["error"]
    assert (out / "0.3-uniform" / "report.json").is_file() and not (out / "0.5-uniform").exists()
    assert "failed" in (out / "sweep.md").read_text()


def test_force_replaces_an_earlier_sweep(reference, tiny_workspace, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    profile = parse_profile(_text(tiny_workspace, out, SWEEP.replace("[0.3, 0.5]", "[0.5]").replace(
        '"uniform", "loss-aware"', '"uniform"')))
    with pytest.raises(Exception, match="already exists"):
        run(profile)
    path = tmp_path / "sweep.toml"
    path.write_text(profile.to_toml())
    result = runner.invoke(app, ["run", str(path), "--force", "--log-format", "plain"])  # the CLI's sweep summary
    assert result.exit_code == 0, result.output
    assert "every cell" in result.output and "0.5-uniform" in result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "0.5-uniform", "profile.toml", "sweep.json", "sweep.md"]


# ---------------------------------------------------------------------------------- table and plot


def _summary():
    def cell(ratio, label, ppl, kept):
        return {"cell": f"{ratio:g}-{label}", "ratio": ratio, "allocator": label, "label": label, "options": {},
                "sequential": False, "update": "none", "ratio_targeted": ratio, "ratio_model": ratio * 0.8,
                "params_model": kept, "metrics": [{"evaluator": "perplexity", "dataset": "corpus.txt",
                                                   "metric": "perplexity", "dense": 10.0, "compressed": ppl}],
                "time_s": 1.5, "timings": {}}

    return {"format": 1, "kind": "sweep", "profile_name": "t", "output_dir": "runs/t", "model": {"source": "m"},
            "params": {"model_dense": 1000}, "dense": [{"evaluator": "perplexity", "dataset": "corpus.txt",
                                                        "metric": "perplexity", "dense": 10.0}],
            "cells": [cell(0.2, "uniform", 30.0, 840), cell(0.2, "loss-aware", 20.0, 840),
                      cell(0.4, "uniform", 90.0, 680), cell(0.4, "loss-aware", 50.0, 680)],
            "failed": [], "timings": {"shared": {"calibrate": 5.0}, "shared_s": 5.0, "cells_s": 6.0, "total_s": 11.0}}


def test_sweep_md_pivots_the_first_metric_by_ratio():
    from workbench.render.sweep_table import render_sweep_md, series

    text = render_sweep_md(_summary())
    assert "| perplexity (corpus.txt) | 20% | 40% |" in text
    assert "| uniform | 30.00 | 90.00 |" in text and "| loss-aware | 20.00 | 50.00 |" in text
    assert series(_summary(), ("perplexity", "corpus.txt", "perplexity"))["uniform"] == [(0.68, 90.0), (0.84, 30.0)]


def test_sweep_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(_summary()))
    result = runner.invoke(app, ["sweep-plot", str(tmp_path / "s"), "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--metric", "accuracy"], "no metric 'accuracy'"),
    (["--out", "missing/p.png"], "does not exist"),
])
def test_sweep_plot_refuses_bad_options(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(_summary()))
    result = runner.invoke(app, ["sweep-plot", "s", *args])
    assert result.exit_code == 2 and message in result.output


def test_sweep_plot_of_a_plain_run_says_what_it_needs(tmp_path):
    result = runner.invoke(app, ["sweep-plot", str(tmp_path)])
    assert result.exit_code == 2 and "not a sweep output" in result.output


def test_the_app_lists_a_sweep_as_one_entry_that_opens_to_its_table_and_chart(reference, tmp_path):
    import asyncio
    import shutil

    pytest.importorskip("textual")
    from textual.widgets import DataTable

    from workbench.tui.app import WorkbenchApp
    from workbench.tui.screens.sweep import SweepChart, SweepScreen

    runs = tmp_path / "runs"
    shutil.copytree(reference[0], runs / "my-sweep")
    (tmp_path / "profiles").mkdir()

    async def flow():
        app = WorkbenchApp(tmp_path / "profiles", runs)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("3")
            await pilot.pause()
            assert [(r.path.name, r.ratio) for r in app.screen.runs] == [("my-sweep", "sweep: 4 cells")]
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, SweepScreen)
            assert app.screen.query_one("#sweep-cells", DataTable).row_count == 1 + len(CELLS)  # dense + cells
            assert app.screen.query_one(SweepChart).data["cells"]

    asyncio.run(flow())


def test_the_app_chart_goes_through_every_metric_with_m(tmp_path):
    import asyncio

    pytest.importorskip("textual")
    from workbench.tui.app import WorkbenchApp
    from workbench.tui.screens.sweep import SweepChart, SweepScreen

    summary = _summary()
    accuracy = {"evaluator": "zero-shot", "dataset": "arc", "metric": "accuracy", "dense": 0.5}
    summary["dense"].append(accuracy)
    for i, cell in enumerate(summary["cells"]):
        cell["metrics"].append({**accuracy, "compressed": 0.4 - 0.05 * i})
    (tmp_path / "runs" / "s").mkdir(parents=True)
    (tmp_path / "runs" / "s" / "sweep.json").write_text(json.dumps(summary))
    (tmp_path / "profiles").mkdir()

    async def flow():
        app = WorkbenchApp(tmp_path / "profiles", tmp_path / "runs")
        async with app.run_test(size=(120, 30)) as pilot:
            await pilot.press("3")
            await pilot.pause()
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, SweepScreen)
            chart = app.screen.query_one(SweepChart)
            seen = [chart.key]
            for _ in range(2):
                await pilot.press("m")
                await pilot.pause()
                seen.append(chart.key)
            return seen

    seen = asyncio.run(flow())
    assert seen == [("perplexity", "corpus.txt", "perplexity"), ("zero-shot", "arc", "accuracy"),
                    ("perplexity", "corpus.txt", "perplexity")]


def test_the_terminal_summary_shows_the_pivot_and_every_cell():
    from rich.console import Console

    from workbench.render.sweep_table import print_sweep_summary

    console = Console(record=True, width=200)
    print_sweep_summary(console, _summary())
    text = console.export_text()
    assert "0.4-loss-aware" in text and "20%" in text and "dense 10.00" in text
    assert "shared stages 5.0 s, cells 6.0 s, total 11.0 s" in text


def test_profile_validate_accepts_the_sweep_profiles():
    from pathlib import Path

    profiles = Path(__file__).resolve().parents[1] / "profiles"
    result = runner.invoke(app, ["profile", "validate", str(profiles / "quickstart-sweep.toml"),
                                 str(profiles / "paper-drank-llama-7b-sweep.toml")])
    assert result.exit_code == 0, result.output
