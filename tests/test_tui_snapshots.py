"""Snapshot tests of each screen at 80×24 (pytest-textual-snapshot; Textual is pinned, see pyproject).

Update the goldens after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pytest_textual_snapshot")

from workbench.events import EventBus  # noqa: E402
from workbench.tui.app import WorkbenchApp  # noqa: E402

SIZE = (80, 24)

PROFILE = """\
# A profile for the snapshots.
name = "small"
description = "a small test profile"

[model]
source = "embedded:smollm2-135m"
device = "cpu"

[compression]
ratio = 0.25
allocator = "uniform"
group_size = 2

[[evaluate]]
evaluator = "perplexity"
max_windows = 4
"""


def fake_report(name: str, ratio: float, dense: float, compressed: float) -> dict:
    ranks = [{"group": f"{t}:{i}", "type": t, "layers": [i], "in": 64, "out": 64, "rank": r + i, "max_rank": 32,
              "dense": False, "effective_rank": r / 2 + i, "params": 128 * (r + i)}
             for t, r in (("q_proj", 10), ("up_proj", 20)) for i in range(4)]
    return {"profile_name": name, "output_dir": f"runs/{name}", "model": {"source": "embedded:smollm2-135m"},
            "allocator": {"name": "uniform", "options": {}},
            "params": {"ratio_requested": ratio, "ratio_targeted": ratio, "ratio_model": ratio * 0.8},
            "ranks": ranks,
            "metrics": [{"evaluator": "perplexity", "dataset": "embedded:wiki-vital", "metric": "perplexity",
                         "dense": dense, "compressed": compressed}],
            "timings": {"total_s": 12.5, "compress_s": 7.25}, "profile": {"compression": {"group_size": 2}}}


@pytest.fixture(autouse=True)
def fixed_memory_reading(monkeypatch):
    """The app samples this process's real RSS once a second: a fixed reading keeps the SVGs stable."""
    import functools

    from workbench.run import live_memory
    from workbench.tui import app as app_module

    def fixed(rank: int = 0) -> live_memory.MemorySample:
        return live_memory.MemorySample(512 << 20, (), rank)

    monkeypatch.setattr(app_module, "MemorySampler", functools.partial(live_memory.MemorySampler, read=fixed))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles/small.toml").write_text(PROFILE)
    (tmp_path / "profiles/broken.toml").write_text(PROFILE.replace("ratio = 0.25", "ratio = 1.5").replace('"small"', '"broken"'))
    for name, ratio, compressed in (("small-a", 0.2, 24.1), ("small-b", 0.4, 31.7)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "report.json").write_text(json.dumps(fake_report(name, ratio, 20.3, compressed)))
        (run / "report.md").write_text(f"# Report of {name}\n\nperplexity 20.3 → {compressed}\n")
    return tmp_path


def fake_pipeline(profile, *, output_dir, force, events: EventBus, cancel, registry, resume):
    """Emits a run's worth of events with fixed numbers, so the finished run screen is deterministic."""
    events.emit("stage_start", "load", "embedded:smollm2-135m", memory_bytes=300 << 20)
    events.emit("stage_end", "load", "1.0 s", memory_bytes=400 << 20)
    events.emit("stage_start", "calibrate", "8 × 32 tokens", memory_bytes=400 << 20)
    for i in range(1, 5):
        events.progress("calibrate", i, 4, data={"unit": "layer"}, memory_bytes=(400 + 10 * i) << 20)
    events.emit("stage_end", "calibrate", "2.0 s", memory_bytes=450 << 20)
    return fake_report(profile.name, 0.25, 20.3, 24.1) | {"output_dir": str(output_dir)}


def app() -> WorkbenchApp:
    return WorkbenchApp(Path("profiles"), Path("runs"), pipeline=fake_pipeline)


def test_profiles_screen(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE)


def test_profiles_screen_invalid_profile_selected(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["home"])  # broken.toml sorts first


def test_editor_screen(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["down", "e"])


def test_editor_raw_toml_view(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["down", "e", "ctrl+t"])


def test_run_screen_idle(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["2"])


def test_run_screen_finished(workspace, snap_compare):
    async def run_it(pilot):
        await pilot.press("down", "r")
        for _ in range(100):
            if pilot.app.progress is not None and pilot.app.progress.finished:
                break
            await pilot.pause(0.05)
        await pilot.pause()

    assert snap_compare(app(), terminal_size=SIZE, run_before=run_it)


def test_results_screen(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["3", "space"])


def test_compare_screen(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["3", "space", "down", "space", "c"])


def test_run_detail_screen(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["3", "enter"])


def test_help_screen(workspace, snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["question_mark"])


def test_quit_asks_while_running(workspace, snap_compare):
    """The confirm dialog, shown over a run that is still going (the fake pipeline waits for cancel)."""
    import threading

    release = threading.Event()

    def slow_pipeline(profile, *, cancel, events, **_):
        events.emit("stage_start", "calibrate", "", memory_bytes=1 << 30)
        for _ in range(250):  # at most 5 s: the app waits for its worker thread when the test closes it
            if release.wait(0.02):
                break
            cancel.check()
        return fake_report(profile.name, 0.25, 20.3, 24.1)

    the_app = WorkbenchApp(Path("profiles"), Path("runs"), pipeline=slow_pipeline)

    async def start_then_quit(pilot):
        await pilot.press("down", "r")
        await pilot.pause(0.2)
        await pilot.press("q")
        await pilot.pause()

    try:
        assert snap_compare(the_app, terminal_size=SIZE, run_before=start_then_quit)
    finally:
        release.set()
