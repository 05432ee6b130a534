"""Checks of what a plugin declares, run when it registers.

A bad declaration (an option whose `type` is a string, `choices` given as one string, a `min`
that is not a number, `needs` that is not a tuple of names) would otherwise surface much later as a
TypeError inside `workbench profile validate` or in the middle of a run, blaming nobody. Caught
here, it becomes a load failure that names the plugin and its version, and the plugin is left out.
"""

from __future__ import annotations

from typing import Any

from workbench.api import Option


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_option(owner: str, option: Any) -> None:
    if not isinstance(option, Option):
        raise TypeError(f"{owner}: options must be workbench.api.Option, got {option!r}")
    where = f"{owner}: option {option.name!r}"
    if not isinstance(option.name, str) or not option.name.strip():
        raise TypeError(f"{where}: the name must be a non-empty string")
    if not isinstance(option.type, type):
        raise TypeError(f"{where}: type must be a class such as int or str, got {option.type!r}")
    if option.choices is not None and not isinstance(option.choices, (tuple, list)):
        raise TypeError(f"{where}: choices must be a tuple, got {type(option.choices).__name__}")
    for bound in ("min", "max"):
        value = getattr(option, bound)
        if value is not None and not _is_number(value):
            raise TypeError(f"{where}: {bound} must be a number, got {value!r}")


def check_declaration(kind: str, obj: Any) -> None:
    """Raise TypeError/ValueError describing the first thing wrong with a registered plugin object."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"{type(obj).__name__} needs a non-empty string `name`, got {name!r}")
    owner = f"{kind} '{name}'"
    options = getattr(obj, "options", ())
    if not isinstance(options, (tuple, list)):
        raise TypeError(f"{owner}: options must be a tuple of Option, got {type(options).__name__}")
    for option in options:
        check_option(owner, option)
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: options declared twice: {sorted({n for n in names if names.count(n) > 1})}")
    if kind == "allocator":
        needs = getattr(obj, "needs", ())
        if not isinstance(needs, (tuple, list)) or not all(isinstance(n, str) for n in needs):
            raise TypeError(f"{owner}: needs must be a tuple of signal names, got {needs!r}")
        # Whether each named signal is registered is checked when a profile names the allocator:
        # the plugin providing it may load later.
    if kind == "adapter" and not _is_number(getattr(obj, "priority", 0)):
        raise TypeError(f"{owner}: priority must be a number, got {obj.priority!r}")
