"""Profile files on disk, as the profiles screen lists and manages them. No Textual here.

Renaming and duplicating go through tomlkit so the user's comments and layout survive.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from workbench.errors import ProfileError, UsageError
from workbench.profile.schema import MAX_PROFILE_BYTES, parse_profile
from workbench.sources.files import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# What "new profile" writes: small, commented, and runnable as is (the embedded model).
NEW_PROFILE = """\
# {name}: created in the workbench app. Keys left out take their defaults.
name = "{name}"
description = ""

[model]
source = "embedded:smollm2-135m"
device = "auto"

[calibration]
dataset = "embedded:wiki-vital"
samples = 32
seq_len = 512

[compression]
ratio = 0.2
allocator = "loss-aware"
group_size = 1

[[evaluate]]
evaluator = "perplexity"
dataset = "embedded:wiki-vital"
seq_len = 512
max_windows = 16

[output]
dir = "runs/{name}"
"""


@dataclass(frozen=True)
class ProfileEntry:
    """One row of the profiles list: the key facts, or the first problem when it does not validate."""

    path: Path
    name: str
    model: str
    ratio: str
    allocator: str
    group_size: str
    evaluators: str
    output_dir: str
    problem: str | None = None


def _text(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def read_entry(path: Path, registry: Any = None) -> ProfileEntry:
    """The row of one profile file; one that cannot be read at all is still listed, with why."""
    try:
        text = read_text(path, "profile", MAX_PROFILE_BYTES)
    except UsageError as exc:
        return ProfileEntry(path, path.stem, "?", "?", "?", "?", "?", "?", str(exc))
    try:
        p = parse_profile(text, str(path), registry)
    except ProfileError as exc:
        return _raw_entry(path, text, str(exc.problems[0]) if exc.problems else str(exc))
    return ProfileEntry(path, p.name, p.model.source, f"{p.compression.ratio:g}", p.compression.allocator,
                        _text(p.compression.group_size), ", ".join(e.evaluator for e in p.evaluate) or "none",
                        p.output.dir)


def _raw_entry(path: Path, text: str, problem: str) -> ProfileEntry:
    """Best-effort facts of an invalid profile, so it still shows (and can be fixed) in the list."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):  # also a 5000-digit integer, [[[[…
        data = {}
    section = lambda name: data.get(name) if isinstance(data.get(name), dict) else {}  # noqa: E731
    comp = section("compression")
    evaluate = data.get("evaluate") if isinstance(data.get("evaluate"), list) else []
    names = ", ".join(str(e.get("evaluator", "?")) for e in evaluate if isinstance(e, dict))
    return ProfileEntry(path, str(data.get("name", path.stem)), _text(section("model").get("source")),
                        _text(comp.get("ratio")), _text(comp.get("allocator")), _text(comp.get("group_size")),
                        names or "none", _text(section("output").get("dir", f"runs/{path.stem}")), problem)


def list_profiles(folder: Path, registry: Any = None) -> list[ProfileEntry]:
    if not folder.is_dir():
        return []
    return [read_entry(p, registry) for p in sorted(folder.glob("*.toml"))]


def check_stem(name: str, folder: Path) -> str | None:
    """Why `name` cannot be a new profile file in `folder`, or None when it can."""
    if not _STEM.match(name):
        return "use letters, digits, '.', '_' or '-' (no spaces, no leading dot)"
    if (folder / f"{name}.toml").exists():
        return f"{name}.toml already exists"
    return None


def create_profile(folder: Path, name: str) -> Path:
    _refuse(check_stem(name, folder))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(NEW_PROFILE.format(name=name), encoding="utf-8")
    return path


def _renamed_text(text: str, old_stem: str, new_stem: str) -> str:
    """The profile text for its new file name: `name` and a default-looking output dir follow."""
    try:
        doc = tomlkit.parse(text)
    except RecursionError:
        raise ValueError("the profile is nested too deeply to read") from None
    if "name" in doc:
        doc["name"] = new_stem
    output = doc.get("output")
    # Only a dir that followed the old name moves: two profiles writing to one folder would clash.
    if isinstance(output, dict) and output.get("dir") == f"runs/{old_stem}":
        output["dir"] = f"runs/{new_stem}"
    return tomlkit.dumps(doc)


def _source_text(path: Path) -> str:
    try:
        return read_text(path, "profile", MAX_PROFILE_BYTES)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def duplicate_profile(path: Path, name: str) -> Path:
    _refuse(check_stem(name, path.parent))
    target = path.parent / f"{name}.toml"
    target.write_text(_renamed_text(_source_text(path), path.stem, name), encoding="utf-8")
    return target


def rename_profile(path: Path, name: str) -> Path:
    _refuse(check_stem(name, path.parent))
    target = path.parent / f"{name}.toml"
    target.write_text(_renamed_text(_source_text(path), path.stem, name), encoding="utf-8")
    path.unlink()
    return target


def delete_profile(path: Path) -> None:
    path.unlink()


def _refuse(reason: str | None) -> None:
    if reason:
        raise ValueError(reason)
