"""The profile editor's form, as data: which fields exist, how text becomes TOML values, and the
checks. No Textual here, so the rules are testable without an app.

Fields come from `workbench.profile.schema.SECTIONS` / `TOP_LEVEL` and from the `options` each allocator
and evaluator plugin declares, so a third-party plugin's options appear without app changes.
Values are written into a tomlkit document: comments and layout of the file survive a save.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from workbench.errors import ProfileError
from workbench.api import Option
from workbench.profile.schema import DEFAULT_ALLOCATOR, SECTIONS, TOP_LEVEL, parse_profile
from workbench.profile.sweep import SWEEP_OPTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Key = tuple  # ("model", "source"), ("evaluate", 0, "seq_len"), ("name",)


@dataclass(frozen=True)
class Field:
    key: Key
    option: Option
    choices: tuple[Any, ...] | None = None  # shown as a select; None: a text input

    @property
    def dotted(self) -> str:
        return dotted(self.key)


@dataclass(frozen=True)
class FormSection:
    title: str
    fields: tuple[Field, ...]


def dotted(key: Key) -> str:
    """('evaluate', 0, 'seq_len') -> 'evaluate[0].seq_len', the spelling problems use."""
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _field(key: Key, option: Option, choices: tuple | None = None) -> Field:
    if choices is None and option.choices:
        choices = tuple(option.choices)
    if choices is None and option.type is bool:
        choices = (True, False)
    return Field(key, option, choices)


def _with_current(names: list[str], current: Any) -> tuple:
    """Choices for a plugin select; an unknown current name stays selectable so the check can name it."""
    if isinstance(current, str) and current not in names:
        names = [*names, current]
    return tuple(names)


def _name(value: Any) -> str | None:
    """A plugin name from the document, or None: the value may be anything (a list is unhashable)."""
    return value if isinstance(value, str) else None


def build_sections(doc: Any, registry: Any) -> list[FormSection]:
    """The form for the profile in `doc` (a tomlkit document or plain dict)."""
    sections = [FormSection("Profile", tuple(_field((o.name,), o) for o in TOP_LEVEL))]
    for name, options in SECTIONS.items():
        fields = []
        for o in options:
            if o.name == "allocator_options":
                continue  # its own section below, from the chosen allocator's declaration
            choices = None
            if (name, o.name) == ("compression", "allocator"):
                choices = _with_current(sorted(registry.allocators), get_value(doc, (name, o.name)) or o.default)
            fields.append(_field((name, o.name), o, choices))
        sections.append(FormSection(f"[{name}]", tuple(fields)))
        if name == "compression":
            allocator = registry.allocators.get(_name(get_value(doc, ("compression", "allocator"))) or DEFAULT_ALLOCATOR)
            if allocator is not None and allocator.options:
                key = ("compression", "allocator_options")
                sections.append(FormSection(f"[compression.allocator_options] ({allocator.name})",
                                            tuple(_field((*key, o.name), o) for o in allocator.options)))
    sections.append(FormSection("[sweep] (lists: one run per combination; empty: no sweep)",
                                tuple(_field(("sweep", o.name), o) for o in SWEEP_OPTIONS)))
    evaluate = get_value(doc, ("evaluate",))
    for i, entry in enumerate(evaluate if isinstance(evaluate, list) else []):
        name = entry.get("evaluator") if isinstance(entry, dict) else None
        picker = Option("evaluator", str, None, "the registered evaluator")
        fields = [_field(("evaluate", i, "evaluator"), picker, _with_current(sorted(registry.evaluators), name))]
        evaluator = registry.evaluators.get(_name(name))
        if evaluator is not None:
            fields += [_field(("evaluate", i, o.name), o) for o in evaluator.options]
        sections.append(FormSection(f"[[evaluate]] #{i + 1}", tuple(fields)))
    return sections


# --------------------------------------------------------------------------- values in the document


def get_value(doc: Any, key: Key) -> Any:
    node = doc
    for part in key:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node.unwrap() if hasattr(node, "unwrap") else node


_REMOVE = object()


def set_value(doc: Any, key: Key, value: Any) -> None:
    """Set (or, for REMOVE, delete) `key` in a tomlkit document, creating tables as needed."""
    node = doc
    for depth, part in enumerate(key[:-1]):
        if isinstance(key[depth + 1], int):  # ("evaluate", 0, ...): the form only offers entries that exist
            if not isinstance(node.get(part), list) or key[depth + 1] >= len(node[part]):
                return
            node = node[part]
            continue
        child = node[part] if isinstance(part, int) else node.get(part)
        if not isinstance(child, dict):  # missing, or not a table (`model = 5`, `evaluate = [1]`): make one
            if value is _REMOVE:
                return
            # an entry of an inline array (`evaluate = [1]`) must be an inline table
            node[part] = tomlkit.inline_table() if isinstance(part, int) else tomlkit.table()
            child = node[part]
        node = child
    last = key[-1]
    if value is _REMOVE:
        if last in node:
            del node[last]
        if key[0] == "sweep" and len(key) == 2 and isinstance(doc.get("sweep"), dict) and not doc["sweep"]:
            del doc["sweep"]  # an empty [sweep] is an error: the last value cleared means no sweep
    elif get_value(node, (last,)) != value or type(get_value(node, (last,))) is not type(value):
        node[last] = value  # only when it changed, so untouched values keep their exact spelling


def parse_input(text: str, option: Option) -> Any:
    """What the user typed, as a TOML value. Empty: REMOVE (the default applies).

    Text that is not a TOML value stays a string, so the profile check reports it in its own words
    ("expected an integer, got '12x'") rather than the form inventing another message.
    """
    if not text.strip():
        return _REMOVE
    if option.type is str:
        return text
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # not TOML; an integer of 5000 digits; a paste of "[[[[…" too deep
        return text
    # tomlkit writes nested values recursively: a few hundred levels would crash every later save
    return value if _depth(value) <= MAX_TYPED_DEPTH else text


MAX_TYPED_DEPTH = 16  # no profile value nests more than three levels


def _depth(value: Any) -> int:
    """How deeply lists and tables nest in `value` (a scalar: 0), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        node, level = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            deepest = max(deepest, level)
        else:
            deepest = max(deepest, level + 1)
            todo.extend((child, level + 1) for child in children)
    return deepest


def format_value(value: Any) -> str:
    """A document value as the text shown in an input."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return tomlkit.item(value).as_string()


def load_document(path: Any) -> Any:
    """The profile at `path` as a tomlkit document for the editor.

    Raises ValueError with a message for the user when the file cannot be edited as TOML: opening
    it anyway would show an empty form, and saving that would overwrite the user's file.
    """
    from workbench.sources.files import file_problem

    problem = file_problem(path)  # a FIFO would hang the app, /dev/zero fill its memory
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomlkit.parse(text)
    except (ValueError, RecursionError) as exc:  # ParseError is a ValueError; so is a 5000-digit integer
        detail = str(exc).split("; use sys.")[0] if isinstance(exc, ValueError) else "nested too deeply"
        raise ValueError(f"{path}: not valid TOML ({detail}); fix it in a text editor "
                         "(`workbench profile validate` shows where)") from None


def problems(text: str, file: str, registry: Any) -> list[str]:
    """The same messages as `workbench profile validate FILE`, one string each ([] when valid)."""
    try:
        parse_profile(text, file, registry)
    except ProfileError as exc:
        return [str(p) for p in exc.problems]
    return []


REMOVE = _REMOVE
