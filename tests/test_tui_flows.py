"""Pilot tests of the app's main flows on a tiny model: profile form → run → live progress →
results → compare; cancel leaves the output directory as it was."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable, Input, ProgressBar  # noqa: E402

from workbench.tui.app import WorkbenchApp  # noqa: E402
from workbench.tui.screens.editor import EditorScreen  # noqa: E402
from workbench.tui.screens.run import RunScreen  # noqa: E402

SIZE = (80, 24)


async def wait_until(pilot, condition, seconds: float = 120.0) -> None:
    """Let the app run until `condition()` holds (runs take a few seconds on a tiny model)."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError("timed out waiting for the app")


async def fill(pilot, app, dotted: str, text: str) -> None:
    widget = app.screen.query_one("#f-" + dotted.replace(".", "_").replace("[", "_").replace("]", "_"), Input)
    widget.value = text
    await pilot.pause()


def tiny_values(workspace: Path) -> dict[str, str]:
    return {
        "model.source": str(workspace / "tiny-llama"), "model.device": "cpu",
        "calibration.dataset": str(workspace / "corpus.txt"), "calibration.samples": "8", "calibration.seq_len": "32",
        "compression.ratio": "0.3", "evaluate[0].dataset": str(workspace / "corpus.txt"),
        "evaluate[0].seq_len": "32", "evaluate[0].max_windows": "4",
    }


async def create_in_form(pilot, app, name: str, workspace: Path, ratio: str) -> Path:
    await pilot.press("n")
    await pilot.press(*name, "enter")
    await wait_until(pilot, lambda: isinstance(app.screen, EditorScreen) and app.screen.fields)
    values = {**tiny_values(workspace), "compression.ratio": ratio}
    for key, text in values.items():
        await fill(pilot, app, key, text)
    assert app.screen.validate() == []
    await pilot.press("ctrl+s")
    await pilot.press("escape")
    await pilot.pause()
    return app.profiles_dir / f"{name}.toml"


async def run_selected(pilot, app) -> None:
    await pilot.press("r")
    await wait_until(pilot, lambda: app.progress is not None)
    await wait_until(pilot, lambda: app.progress.finished is not None)
    assert app.progress.finished == "done", app.progress.outcome


def test_create_run_watch_results_compare(tiny_workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asyncio.run(_create_run_watch_results_compare(tiny_workspace, tmp_path))


async def _create_run_watch_results_compare(tiny_workspace, tmp_path):
    app = WorkbenchApp(Path("profiles"), Path("runs"))
    async with app.run_test(size=SIZE) as pilot:
        first = await create_in_form(pilot, app, "tiny-a", tiny_workspace, "0.3")
        text = first.read_text()
        assert "# tiny-a: created in the workbench app" in text  # the template's comment survived the save
        assert 'max_windows = 4' in text and "ratio = 0.3" in text

        table = app.screen.query_one("#profiles", DataTable)
        assert table.row_count == 1
        await run_selected(pilot, app)
        # the run screen watched it to the end: the last stage's bar is full and the log says so
        run_screen = app.screen
        assert isinstance(run_screen, RunScreen)
        bar = run_screen.query_one(ProgressBar)
        assert bar.progress == bar.total
        assert any(line.startswith("▶ calibrate") for line in app.progress.log)
        assert any("layer" in line or "calibrate" in line for line in app.progress.log)
        assert app.progress.peak_memory > 0
        assert (tmp_path / "runs/tiny-a/report.json").is_file()

        await pilot.press("1")
        await pilot.press("c")  # copy the profile as tiny-b, with a higher ratio
        await pilot.press("ctrl+a", "ctrl+k", *"tiny-b", "enter")
        await pilot.pause()
        second = app.profiles_dir / "tiny-b.toml"
        assert 'dir = "runs/tiny-b"' in second.read_text()  # the copy writes its own output
        second.write_text(second.read_text().replace("ratio = 0.3", "ratio = 0.5"))
        app.screen.reload(select=second)
        await run_selected(pilot, app)

        await pilot.press("3")
        await pilot.pause()
        runs = app.screen.query_one("#runs", DataTable)
        assert runs.row_count == 2
        assert [r.profile for r in app.screen.runs] == ["tiny-a", "tiny-b"]
        assert "→" in app.screen.runs[0].perplexity
        await pilot.press("space", "down", "space", "c")
        await pilot.pause()
        compare = app.screen.query_one("#compare", DataTable)
        assert [str(c.label) for c in compare.ordered_columns][1:] == ["tiny-a", "tiny-b"]
        rows = [[str(cell) for cell in compare.get_row_at(i)] for i in range(compare.row_count)]  # cells are Text
        ratios = [row for row in rows if row[0] == "ratio (targeted)"]
        assert ratios and ratios[0][1] != ratios[0][2]


def test_cancel_mid_run_leaves_output_as_it_was(tiny_workspace, tmp_path, monkeypatch):
    from tests.conftest import tiny_profile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    out = tmp_path / "runs/tiny"
    (tmp_path / "profiles/tiny.toml").write_text(tiny_profile(tiny_workspace, out))
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"profile_name": "earlier", "workbench_version": "0"}))
    before = sorted(p.name for p in out.parent.iterdir()), (out / "report.json").read_text()
    # Slow each calibrated layer down so the cancel lands in calibration on any machine.
    import time

    import workbench.engine.walk as engine  # where the layer walk calls run_layer

    real_run_layer = engine.run_layer

    def slow_run_layer(*args, **kwargs):
        time.sleep(0.5)
        return real_run_layer(*args, **kwargs)

    monkeypatch.setattr(engine, "run_layer", slow_run_layer)
    asyncio.run(_cancel_mid_run(out))
    work = out.with_name("tiny.work")
    after = sorted(p.name for p in out.parent.iterdir() if p != work), (out / "report.json").read_text()
    assert after == before  # no staging leftovers, the earlier output untouched
    assert (work / "state.json").exists()  # the cancelled run's checkpoint: running it again goes on from there


async def _cancel_mid_run(out):
    app = WorkbenchApp(Path("profiles"), Path("runs"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        await pilot.pause()
        await pilot.press("y")  # the output exists: replacing it is asked, never silent
        await wait_until(pilot, lambda: app.progress is not None and app.progress.stage == "calibrate")
        await pilot.press("c")
        await wait_until(pilot, lambda: app.progress.finished is not None)
        assert app.progress.finished == "cancelled"


def test_running_a_cancelled_profile_again_goes_on_from_its_checkpoint(tiny_workspace, tmp_path, monkeypatch):
    from tests.conftest import tiny_profile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    out = tmp_path / "runs/tiny"
    (tmp_path / "profiles/tiny.toml").write_text(tiny_profile(tiny_workspace, out))
    import time

    import workbench.engine.walk as engine  # where the layer walk calls run_layer

    real_run_layer = engine.run_layer

    def slow_run_layer(*args, **kwargs):
        time.sleep(0.5)
        return real_run_layer(*args, **kwargs)

    monkeypatch.setattr(engine, "run_layer", slow_run_layer)
    asyncio.run(_cancel_then_run_again())
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_checkpoint"][0] == "dense metrics"
    assert not out.with_name("tiny.work").exists()


async def _cancel_then_run_again():
    app = WorkbenchApp(Path("profiles"), Path("runs"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        await wait_until(pilot, lambda: app.progress is not None and app.progress.stage == "calibrate")
        await pilot.press("c")
        await wait_until(pilot, lambda: app.progress.finished is not None)
        assert app.progress.finished == "cancelled" and "checkpoint" in app.progress.outcome
        await pilot.press("1")
        await pilot.pause()
        await pilot.press("r")
        await wait_until(pilot, lambda: app.progress.finished == "done")


def test_new_user_sees_profiles_and_starts_quickstart_with_shown_keys(tmp_path, monkeypatch):
    """Next to a profiles/ folder: the list shows at once, and the footer's `r` runs the selection."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "profiles", tmp_path / "profiles")
    started = []

    def fake_pipeline(profile, **kwargs):
        started.append((profile.name, Path(kwargs["output_dir"])))
        return {"output_dir": str(kwargs["output_dir"]), "metrics": []}

    async def scenario():
        app = WorkbenchApp(Path("profiles"), Path("runs"), pipeline=fake_pipeline)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            screen = app.screen
            names = [e.name for e in screen.entries]
            assert "quickstart" in names
            shown = {key: b.binding.description for key, b in screen.active_bindings.items() if b.binding.show}
            assert shown.get("r") == "Run" and shown.get("q") == "Quit"  # what the footer lists
            screen.query_one("#profiles", DataTable).move_cursor(row=names.index("quickstart"))
            await pilot.press("r")
            await wait_until(pilot, lambda: app.progress is not None and app.progress.finished == "done")
            assert isinstance(app.screen, RunScreen)

    asyncio.run(scenario())
    assert started == [("quickstart", Path("runs/quickstart"))]
