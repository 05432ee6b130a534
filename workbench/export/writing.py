"""Where an export is written: a staging folder beside DIR, renamed into place when complete.

Nothing is written outside DIR except that staging folder (in DIR's parent, removed on failure).
An existing DIR is kept unless it is empty or `--force` is given, and even then only when it is a
folder workbench wrote (`workbench.storage.outputs` decides; its marker lists the export's files).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from workbench.errors import UsageError
from workbench.storage.outputs import StagedOutput, not_replaceable, record_entries

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes in '2GB', '500MB', '1.5GiB' or '1000000'; UsageError naming the option otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UsageError(f"--max-shard-size: '{text}' is not a size (e.g. 2GB, 500MB, 1.5GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_overlap(target: Path, run_dirs: list[Path]) -> None:
    resolved = target.resolve()
    for run_dir in run_dirs:
        source = run_dir.resolve()
        if _inside(resolved, source) or _inside(source, resolved):
            raise UsageError(f"--to {target}: the export folder must be outside the run directory {run_dir} "
                             "(and must not contain it); choose another folder")


def check_destination(target: Path, force: bool, run_dirs: list[Path]) -> None:
    """Refuse, before any work, a DIR that would overlap the run or lose someone's files."""
    target = Path(target)
    _refuse_overlap(target, run_dirs)
    if not os.path.lexists(target):
        return
    empty = target.is_dir() and not target.is_symlink() and not any(target.iterdir())
    if empty:
        return
    if not force:
        raise UsageError(f"--to {target} already exists and is not empty; pass --force to replace it "
                         "(atomically), or choose another folder")
    why = not_replaceable(target)
    if why is not None:
        raise UsageError(f"--to {target}: --force replaces only a folder workbench wrote, and {why}; "
                         "move it away or choose another folder")


def _share(folder: Path) -> None:
    """Modes an ordinary folder would have (the umask's), not mkdtemp's owner-only ones: an export is for others."""
    from workbench.sources.models import public_mode

    public_mode(folder, 0o777)
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            public_mode(path, 0o666)


@contextmanager
def staged_export(target: Path, force: bool, run_dirs: list[Path], kind: str) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target` in one rename (two with --force)."""
    check_destination(target, force, run_dirs)
    # force=True: check_destination has already refused what must not be replaced (an empty DIR counts).
    stage = StagedOutput(Path(target), force=True)
    try:
        yield stage.path
        record_entries(stage.path, kind)
        _share(stage.path)
        stage.publish()
    except BaseException:
        stage.discard()
        raise
