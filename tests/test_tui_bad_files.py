"""The app with a profile it cannot edit: it says so and stays up, and the file is left alone."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable  # noqa: E402

from workbench.tui.app import WorkbenchApp  # noqa: E402
from workbench.tui.screens.editor import EditorScreen  # noqa: E402


def test_editing_a_file_that_is_not_toml_is_refused_with_a_message(tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    broken = folder / "broken.toml"
    broken.write_text("[model\nsource = 1\n")

    async def scenario():
        app = WorkbenchApp(folder, tmp_path / "runs")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            names = [e.name for e in app.screen.entries]
            app.screen.query_one("#profiles", DataTable).move_cursor(row=names.index("broken"))
            await pilot.press("e")
            await pilot.pause()
            assert not isinstance(app.screen, EditorScreen)
            assert any("not valid TOML" in n.message and "broken.toml" in n.message for n in app._notifications)

    asyncio.run(scenario())
    assert broken.read_text() == "[model\nsource = 1\n"
