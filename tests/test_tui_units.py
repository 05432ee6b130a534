"""The app's rules without a terminal: form fields from plugin declarations, comment-keeping saves,
the same messages as `workbench profile validate`, merged progress, ETA, the runs index; and the
headless path never importing Textual."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import tomlkit

from workbench.events import Event, EventBus
from workbench.api import Allocator, Option
from workbench.registry import get_registry
from workbench.profile.schema import load_profile, parse_profile
from workbench.tui import form_model
from workbench.tui.profiles_store import create_profile, duplicate_profile, list_profiles, rename_profile
from workbench.tui.run_state import RunJob, RunProgress
from workbench.tui.runs_index import comparison_rows, scan_runs

ROOT = Path(__file__).resolve().parents[1]


def test_headless_path_imports_no_textual():
    code = ("import sys, workbench.cli, workbench.run.pipeline, workbench.render.display, workbench.tui; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


class Greedy(Allocator):
    name = "greedy-test"
    options = (Option("temperature", float, 1.0, "how greedy", min=0.0),)


def registry_with_third_party_allocator():
    real = get_registry()
    return SimpleNamespace(allocators={**real.allocators, "greedy-test": Greedy()}, evaluators=real.evaluators)


def keys(sections):
    return [f.dotted for s in sections for f in s.fields]


def test_form_shows_the_chosen_allocators_declared_options():
    registry = registry_with_third_party_allocator()
    doc = tomlkit.parse('[compression]\nallocator = "uniform"\n[[evaluate]]\nevaluator = "perplexity"\n')
    assert "compression.allocator_options.temperature" not in keys(form_model.build_sections(doc, registry))
    form_model.set_value(doc, ("compression", "allocator"), "greedy-test")
    fields = keys(form_model.build_sections(doc, registry))
    assert "compression.allocator_options.temperature" in fields
    assert "evaluate[0].max_windows" in fields  # the evaluator's declared options too


def test_form_edit_keeps_comments_and_reports_like_validate(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text((ROOT / "profiles/quickstart.toml").read_text())
    doc = tomlkit.parse(path.read_text())
    ratio = next(f for s in form_model.build_sections(doc, get_registry()) for f in s.fields
                 if f.dotted == "compression.ratio")
    form_model.set_value(doc, ratio.key, form_model.parse_input("1.5", ratio.option))
    text = tomlkit.dumps(doc)
    assert "# Fraction of the targeted linear layers' parameters to remove" in text
    assert "ratio = 1.5" in text
    path.write_text(text)
    from workbench.errors import ProfileError

    try:
        load_profile(path)
    except ProfileError as exc:
        cli_messages = [str(p) for p in exc.problems]
    assert form_model.problems(text, str(path), get_registry()) == cli_messages
    form_model.set_value(doc, ratio.key, form_model.parse_input("", ratio.option))  # cleared: the default
    assert "ratio =" not in tomlkit.dumps(doc)


def test_the_form_edits_a_sweep_and_clearing_it_leaves_no_empty_table():
    registry = get_registry()
    doc = tomlkit.parse((ROOT / "profiles/quickstart.toml").read_text())
    fields = {f.dotted: f for s in form_model.build_sections(doc, registry) for f in s.fields}
    assert {"sweep.ratio", "sweep.allocator", "sweep.sequential", "sweep.update"} <= set(fields)
    ratio, allocator = fields["sweep.ratio"], fields["sweep.allocator"]
    form_model.set_value(doc, ratio.key, form_model.parse_input("[0.2, 0.4]", ratio.option))
    typed = '["uniform", {name = "drank-rebalanced", beta = 0.5, label = "b05"}]'
    form_model.set_value(doc, allocator.key, form_model.parse_input(typed, allocator.option))
    text = tomlkit.dumps(doc)
    assert form_model.problems(text, "p.toml", registry) == []
    profile = parse_profile(text, "p.toml", registry)
    assert [c.name for c in profile.sweep.cells()] == ["0.2-uniform", "0.2-b05", "0.4-uniform", "0.4-b05"]
    form_model.set_value(doc, ratio.key, form_model.parse_input("[]", ratio.option))
    assert any("sweep.ratio" in p for p in form_model.problems(tomlkit.dumps(doc), "p.toml", registry))
    for field in (ratio, allocator):
        form_model.set_value(doc, field.key, form_model.parse_input("", field.option))
    text = tomlkit.dumps(doc)
    assert "[sweep]" not in text and form_model.problems(text, "p.toml", registry) == []


def test_typed_text_that_is_no_number_reaches_the_checker_as_text():
    option = Option("samples", int, 32)
    assert form_model.parse_input("12", option) == 12
    assert form_model.parse_input("12x", option) == "12x"
    assert form_model.parse_input('["q_proj"]', Option("targets", list, None)) == ["q_proj"]


def test_profile_store_create_duplicate_rename(tmp_path):
    created = create_profile(tmp_path, "mine")
    assert load_profile(created).output.dir == "runs/mine"
    copy = duplicate_profile(created, "other")
    assert load_profile(copy).name == "other" and load_profile(copy).output.dir == "runs/other"
    assert "# mine: created in the workbench app" in copy.read_text()
    moved = rename_profile(copy, "third")
    assert not copy.exists() and load_profile(moved).name == "third"
    assert [e.name for e in list_profiles(tmp_path)] == ["mine", "third"]


def test_throttled_forwarder_merges_progress_but_keeps_the_end():
    from workbench.tui.messages import ThrottledForwarder

    posted, now = [], [0.0]
    bus = EventBus([ThrottledForwarder(posted.append, 1, rate=10, clock=lambda: now[0])])
    bus.emit("stage_start", "calibrate")
    for i in range(1, 101):
        now[0] += 0.001
        bus.progress("calibrate", i, 100)
    kinds = [(m.event.kind, m.event.current) for m in posted]
    assert kinds == [("stage_start", None), ("progress", 1), ("progress", 100)]


def test_progress_eta_counts_from_first_progress():
    state = RunProgress(RunJob(Path("p.toml"), "p", Path("out")))
    state.apply(Event("stage_start", "calibrate"), now=0.0)
    state.apply(Event("progress", "calibrate", current=1, total=10), now=100.0)  # load time before: not counted
    state.apply(Event("progress", "calibrate", current=3, total=10, memory_bytes=5), now=104.0)
    assert state.eta(now=104.0) == 14.0  # 2 s per layer, 7 left
    assert state.counter_text() == "3/10" and state.peak_memory == 5


def test_runs_index_and_comparison(tmp_path):
    for name, ratio in (("a", 0.2), ("b", 0.4)):
        (tmp_path / name).mkdir()
        report = {"profile_name": name, "params": {"ratio_targeted": ratio}, "allocator": {"name": "uniform"},
                  "metrics": [{"evaluator": "perplexity", "dataset": "d", "metric": "perplexity", "dense": 10.0,
                               "compressed": 12.5}], "timings": {"total_s": 3.0}}
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    (tmp_path / ".a.partial-x").mkdir()  # a run being written has no report yet: not listed
    runs = scan_runs(tmp_path)
    assert [r.profile for r in runs] == ["a", "b"] and runs[0].perplexity == "10 → 12.5"
    rows = dict(comparison_rows(runs))
    assert rows["ratio (targeted)"] == ["0.200", "0.400"] and rows["perplexity (d)"] == ["10 → 12.5"] * 2
