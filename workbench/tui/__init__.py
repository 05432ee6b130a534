"""The Textual workbench: profiles, live runs and results in one terminal app.

Only `workbench tui` (and `workbench` with no arguments) import this package; the headless path
never does, and nothing here reaches into the engine: runs go through `workbench.run.pipeline.run` and
are watched through its events.
"""

from __future__ import annotations

from pathlib import Path


def main(profiles_dir: Path, runs_dir: Path | None = None) -> int:
    """Open the app on `profiles_dir`; results are read from `runs_dir` (default ./runs).

    Returns the exit code: 0 when the user quit, non-zero when the app crashed (Textual shows why).
    """
    from workbench.tui.app import WorkbenchApp

    app = WorkbenchApp(Path(profiles_dir), Path(runs_dir) if runs_dir is not None else Path("runs"))
    app.run()
    return app.return_code or 0
