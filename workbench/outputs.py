"""Output directories that are either complete or absent: stage under a temporary name, then rename.

An existing output is never reused silently; with `force` it is replaced in two renames, so a crash
leaves either the old output or the new one (plus, at worst, a `.replaced-*` leftover to delete).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from workbench.errors import UsageError


def check_target(target: Path, force: bool) -> None:
    """Refuse before any work starts when the output exists or cannot be written."""
    if target.exists() and not force:
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
        self.target = Path(target)
        self.force = force
        check_target(self.target, force)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=root or self.target.parent))

    def publish(self) -> Path:
        if self.target.exists():
            if not self.force:
                raise UsageError(f"output directory {self.target} appeared during the run; the result is kept in {self.path}")
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.replaced-", dir=self.target.parent))
            os.replace(self.target, old / "old")
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
