"""The checks behind workbench.profile.schema: collecting problems with their lines, and checking values.

Each check reports through a `Checker`, which knows the file and where each key is written, and
returns a usable value (the default when the given one is wrong) so checking can go on and every
problem in a profile is found in one pass. Paths are checked relative to the current directory.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

from workbench.errors import Problem
from workbench.api import Option, nearest
from workbench.profile.locate import find_line, key_at, key_lines
from workbench.sources.files import file_problem

EMBEDDED_MODELS = ("embedded:smollm2-135m", "embedded:smollm2-135m-mha")
DATASETS = ("embedded:wiki-vital", "wikitext2", "ptb", "c4")
DATASET_SUFFIXES = (".txt", ".jsonl")  # what workbench.sources.text reads
DEVICES = ("auto", "cpu", "cuda", "cuda:N")

SOURCE_ALLOWED = "embedded:smollm2-135m (or its multi-head copy embedded:smollm2-135m-mha), a hub id 'org/name', a local model directory or a .gguf file"
DATASET_ALLOWED = ", ".join(DATASETS) + ", or a path to a .txt or .jsonl file"
PATTERNS_ALLOWED = "a list of matrix type names (e.g. 'q_proj') or 're:' regular expressions"
GROUP_SIZE_ALLOWED = ("integer >= 1, or a table of matrix type = integer >= 1"
                      " (left out, or a type the table leaves out: the architecture adapter's default)")


class Checker:
    """Collects problems for one profile text, each with the line its key is written on."""

    def __init__(self, file: str, text: str):
        self.file = file
        self.lines = key_lines(text)
        self.problems: list[Problem] = []

    def add(self, key: str, message: str, allowed: str | None = None, suggestion: str | None = None) -> None:
        self.problems.append(Problem(self.file, key, message, find_line(self.lines, key), allowed, suggestion))

    def extend(self, problems: list[Problem]) -> None:
        """Take problems from validate_options, filling in the lines it could not know."""
        for p in problems:
            self.problems.append(p if p.line is not None else dataclasses.replace(p, line=find_line(self.lines, p.key)))

    def table(self, value: Any, key: str, header: str) -> dict:
        if isinstance(value, dict):
            return value
        self.add(key, f"expected a table, got {value!r}", f"a {header} section")
        return {}

    def section(
        self, given: dict, prefix: str, options: tuple[Option, ...], by_hand: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Check the keys of one section; return its values with defaults for anything missing or wrong.

        Keys in `by_hand` have shapes an Option cannot express: passed through for the caller to check.
        """
        declared = {o.name: o for o in options}
        values = {o.name: copy.deepcopy(o.default) for o in options}
        for name, value in given.items():
            key = f"{prefix}.{name}" if prefix else name
            option = declared.get(name)
            if option is None:
                self.add(key, "unknown key", ", ".join(declared), nearest(name, list(declared)))
            elif name in by_hand:
                values[name] = value
            else:
                value, error = option.check(value)
                if error is None:
                    values[name] = value
                else:
                    hint = nearest(value, option.choices) if option.choices and isinstance(value, str) else None
                    self.add(key, error, option.describe(), hint)
        return values


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def path_kind(text: str) -> str | None:
    """'file', 'dir' or None (missing, or not a usable path at all: NUL bytes, unknown ~user)."""
    try:
        path = Path(text).expanduser()
        return "file" if path.is_file() else "dir" if path.is_dir() else None
    except (OSError, ValueError, RuntimeError):
        return None


def shown_path(text: str) -> str:
    """The absolute path a relative one resolves to (against the cwd), for messages."""
    try:
        return str(Path(text).expanduser().absolute())
    except (OSError, ValueError, RuntimeError):
        return text


def check_source(c: Checker, source: str) -> None:
    key = "model.source"
    if source.startswith("embedded:"):
        if source not in EMBEDDED_MODELS:
            hint = nearest(source, EMBEDDED_MODELS)
            c.add(key, f"unknown embedded model {source!r}", ", ".join(EMBEDDED_MODELS), hint)
        return
    kind = path_kind(source)
    # As workbench.sources.models decides: these are meant as paths, never hub ids.
    looks_like_path = source.startswith(("/", ".", "~")) or source.lower().endswith(".gguf") or source.count("/") > 1
    if kind is None and looks_like_path:
        c.add(key, f"path does not exist: {shown_path(source)}", SOURCE_ALLOWED)
    elif kind == "file" and not source.lower().endswith(".gguf"):
        c.add(key, f"{source!r} is a file but not a .gguf file; name the model directory instead", SOURCE_ALLOWED)
    elif kind is None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        c.add(key, f"{source!r} is neither an existing path nor a hub id", SOURCE_ALLOWED)
    # Anything else is an existing path or a hub id; whether the hub has it is found out on loading.


def check_dataset(c: Checker, dataset: str, key: str) -> None:
    if dataset in DATASETS:
        return
    if dataset.lower().endswith(DATASET_SUFFIXES):
        try:
            problem = file_problem(Path(dataset).expanduser())
        except RuntimeError:  # an unknown ~user
            problem = "file not found"
        if problem == "file not found":
            c.add(key, f"file does not exist: {shown_path(dataset)}", DATASET_ALLOWED)
        elif problem:  # a directory, a FIFO, a device, a broken link: say which
            c.add(key, f"{shown_path(dataset)} {problem}", DATASET_ALLOWED)
        return
    c.add(key, f"unknown dataset {dataset!r}", DATASET_ALLOWED, nearest(dataset, DATASETS))


def check_device(c: Checker, device: str) -> None:
    if device not in DEVICES[:3] and not re.fullmatch(r"cuda:\d+", device):
        c.add("model.device", f"unknown device {device!r}", " | ".join(DEVICES), nearest(device, DEVICES[:3]))


def check_group_size(c: Checker, value: Any) -> int | dict[str, int] | None:
    key = "compression.group_size"
    if value is None:  # not given: the adapter decides per matrix type
        return None
    one = Option("group_size", int, 1, min=1)
    if isinstance(value, dict):
        sizes = {}
        for matrix_type, size in value.items():
            size, error = one.check(size)
            if error:
                c.add(f"{key}.{matrix_type}", error, "integer >= 1")
            else:
                sizes[matrix_type] = size
        return sizes
    value, error = one.check(value)
    if error:
        c.add(key, error, GROUP_SIZE_ALLOWED)
        return 1
    return value


def check_patterns(c: Checker, value: Any, key: str) -> list[str]:
    """targets / ignore: plain matrix type names or 're:' patterns that must compile."""
    if not isinstance(value, list):
        c.add(key, f"expected a list, got {value!r}", PATTERNS_ALLOWED)
        return []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            c.add(f"{key}[{i}]", f"expected a matrix type name or 're:' pattern, got {item!r}", PATTERNS_ALLOWED)
        elif item.startswith("re:"):
            try:
                re.compile(item[3:])
            except (re.error, OverflowError, RecursionError, ValueError) as exc:
                message = f"invalid regular expression {item[3:]!r}: {exc}"
                c.add(f"{key}[{i}]", message, "a Python regular expression after 're:'")
    return value


def decode_problem(exc: Exception, text: str, file: str) -> Problem:
    message = str(exc)
    line = getattr(exc, "lineno", None)  # Python 3.14+; older versions only say it in the message
    if m := re.search(r"\(at line (\d+), column (\d+)\)", message):
        line = line or int(m.group(1))
        message = message[: m.start()].rstrip() + f" (column {m.group(2)})"
    elif "(at end of document)" in message:
        line = line or text.count("\n") + 1
        message = message.replace("(at end of document)", "at the end of the file").strip()
    key = key_at(key_lines(text), line)
    return Problem(file, key, f"invalid TOML: {message}", line, "TOML syntax (https://toml.io)")
