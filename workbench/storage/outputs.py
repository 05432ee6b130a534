"""Output directories that are either complete or absent: stage under a temporary name, then rename.

An existing output is never reused silently; with `force` it is replaced in two renames, so a crash
leaves either the old output or the new one (plus, at worst, a `.replaced-*` leftover to delete).

Only a workbench output is ever replaced: a folder with the marker `.workbench-output` (written
into every output since it was added) or, from older versions, a workbench `report.json`, and
nothing in it that workbench does not write. A file, a link, any other folder, the current
directory, one of its parents and the home directory are refused, `--force` or not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from workbench.errors import UsageError

MARKER = ".workbench-output"
# What a run writes at the top of its output (pipeline._run); anything else there is someone else's.
OUTPUT_ENTRIES = {MARKER, "profile.toml", "report.json", "report.md", "model"}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _protected(target: Path) -> str | None:
    """Why replacing `target` would take more than an output with it; None when it would not."""
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current directory or one of its parents"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    return None


def not_replaceable(target: Path) -> str | None:
    """Why the existing `target` must not be replaced (deleted): None only for a workbench output."""
    target = Path(target)
    if target.is_symlink():
        return "it is a symbolic link"
    if not target.is_dir():
        return "it is a file, not a workbench output"
    protected = _protected(target)
    if protected:
        return protected
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return None  # an empty folder: nothing in it to lose
    ours = MARKER in names
    if not ours:
        try:
            report = json.loads((target / "report.json").read_text())
            ours = isinstance(report, dict) and "workbench_version" in report
        except (OSError, ValueError):
            ours = False
    if not ours:
        return (f"it is not a workbench output (no {MARKER} nor workbench report.json"
                + (f"; it holds {_shown(names)})" if names else ")"))
    foreign = [n for n in names if n not in OUTPUT_ENTRIES | _recorded_entries(target)]
    if foreign:
        return f"it holds {_shown(foreign)}, which workbench did not write"
    return None


def _recorded_entries(target: Path) -> set[str]:
    """The entries a non-run output (an export) listed in its marker when it was written."""
    try:
        entries = json.loads((target / MARKER).read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {e for e in entries if isinstance(e, str)} if isinstance(entries, list) else set()


def record_entries(folder: Path, kind: str) -> None:
    """Rewrite `folder`'s marker to list what is in it now, so that --force may later replace a
    `kind` output (e.g. an export) whose files are not a run's, and only while it holds nothing else."""
    from workbench import __version__

    entries = sorted(p.name for p in Path(folder).iterdir() if p.name != MARKER)
    (Path(folder) / MARKER).write_text(json.dumps({"workbench": __version__, "kind": kind, "entries": entries}) + "\n")


def check_target(target: Path, force: bool) -> None:
    """Refuse before any work starts when the output exists or cannot be written."""
    target = Path(target)
    if os.path.lexists(target):
        why = not_replaceable(target)
        if why is not None:
            raise UsageError(f"output directory {target} already exists and --force replaces only a workbench output: "
                             f"{why}. Move it away, or set [output] dir to a new path")
        if not force:
            raise UsageError(f"output directory {target} already exists; pass --force to replace it "
                             f"or set [output] dir to a new path")
    parent = target.parent if target.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file where a directory of the path should be
        raise UsageError(f"cannot create {parent} (output.dir = {target}): {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent} (output.dir = {target})")


class StagedOutput:
    """A temporary directory, published with `publish()` or removed on `discard()`.

    It is made in `root` (the run's work directory, so a killed run leaves nothing beside the
    target but that), or beside the target; either way on the target's file system, so publishing
    is a rename.
    """

    def __init__(self, target: Path, force: bool = False, root: Path | None = None):
        from workbench import __version__

        self.target = Path(target)
        self.force = force
        check_target(self.target, force)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=root or self.target.parent))
        # First, so the output is recognisable as workbench's (and replaceable with --force) later.
        (self.path / MARKER).write_text(json.dumps({"workbench": __version__, "kind": "output"}) + "\n")

    def publish(self) -> Path:
        if os.path.lexists(self.target):
            if not self.force:
                raise UsageError(f"output directory {self.target} appeared during the run; the result is kept in {self.path}")
            why = not_replaceable(self.target)
            if why is not None:
                raise UsageError(f"output directory {self.target} changed during the run and is not replaced: {why}")
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.replaced-", dir=self.target.parent))
            os.replace(self.target, old / "old")
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)  # made above, holding only the old workbench output
        else:
            os.replace(self.path, self.target)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # made by mkdtemp in __init__: only ours
