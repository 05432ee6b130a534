"""A profile's `[sweep]` table: several values of a few `[compression]` keys, one cell per combination.

    [sweep]
    ratio = [0.2, 0.3, 0.4, 0.5]
    allocator = ["uniform", "drank", {name = "drank-rebalanced", beta = 0.5, label = "drank-b0.5"}]
    sequential = [false, true]          # the compensate stage (docs/compensation.md)
    update = ["none", "closed-form"]

Each key lists values for the `[compression]` key of the same name; a key left out keeps the
`[compression]` value. An allocator is its name, with its default options (or, for the
`[compression]` allocator, `[compression.allocator_options]`), or a table: `name`, an optional
`label` (the cell's folder name; default: the name plus the options that differ from the defaults)
and any of the allocator's options. The cells are every combination, ratio outermost, each named
`<ratio>-<label>`, plus `-seq` when sequential and `-<update>` when update is not "none".

What the calibration depends on (the model, `[calibration]`, group_size, targets, ignore,
whitening, gram_precision) cannot be swept: the point of a sweep is that its cells share one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.api import Option, nearest, validate_options
from workbench.profile.checks import Checker, is_number

# The keys as the app's profile form shows them (each one a TOML list, typed as text).
SWEEP_OPTIONS = (
    Option("ratio", list, None, "ratios to sweep, e.g. [0.2, 0.3, 0.4]"),
    Option("allocator", list, None, 'allocators: names, or tables with options, e.g. ["uniform", '
           '{name = "drank-rebalanced", beta = 0.5, label = "drank-b0.5"}]'),
    Option("sequential", list, None, "the compensate stage's re-factoring, e.g. [false, true]"),
    Option("update", list, None, 'the closed-form update, e.g. ["none", "closed-form"]'),
)
SWEEPABLE = tuple(o.name for o in SWEEP_OPTIONS)
SWEEP_ALLOWED = ("ratio = [numbers in [0, 1)], allocator = [names or {name = ..., label = ..., <option> = ...}], "
                 "sequential = [true/false], update = [\"none\", \"closed-form\"]")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class SweepAllocator:
    """One allocator entry of a sweep: the registered name, its resolved options, its label."""

    name: str
    label: str
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, **copy.deepcopy(self.options)}


@dataclass(frozen=True)
class SweepCell:
    """One combination of a sweep: what replaces the `[compression]` keys for that cell."""

    ratio: float
    allocator: SweepAllocator
    sequential: bool
    update: str

    @property
    def name(self) -> str:
        """The cell's folder name inside the sweep's output."""
        return (f"{self.ratio:g}-{self.allocator.label}" + ("-seq" if self.sequential else "")
                + (f"-{self.update}" if self.update != "none" else ""))

    def spec(self) -> dict[str, Any]:
        """What defines the cell, as plain data (sweep.json, the checkpoint's record of finished cells)."""
        return {"ratio": self.ratio, "allocator": self.allocator.name, "label": self.allocator.label,
                "options": copy.deepcopy(self.allocator.options), "sequential": self.sequential,
                "update": self.update}


@dataclass(frozen=True)
class Sweep:
    ratios: tuple[float, ...]
    allocators: tuple[SweepAllocator, ...]
    sequential: tuple[bool, ...]
    update: tuple[str, ...]
    given: tuple[str, ...]  # the keys the [sweep] table sets: the others echo [compression]

    def cells(self) -> list[SweepCell]:
        return [SweepCell(r, a, s, u) for r in self.ratios for a in self.allocators for s in self.sequential
                for u in self.update]

    def needed_signals(self, registry: Any) -> tuple[str, ...]:
        """Every signal some allocator of the sweep needs, each once, in the order first needed."""
        names: dict[str, None] = {}
        for entry in self.allocators:
            names.update(dict.fromkeys(getattr(registry.allocators.get(entry.name), "needs", ())))
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        """The `[sweep]` table as written back (resolved: every allocator a table with its options)."""
        values = {"ratio": list(self.ratios), "allocator": [a.to_dict() for a in self.allocators],
                  "sequential": list(self.sequential), "update": list(self.update)}
        return {key: values[key] for key in SWEEPABLE if key in self.given}


def cell_profile(profile: Any, cell: SweepCell, output_dir: str | Path) -> Any:
    """The profile that runs `cell` alone: the sweep's, with the cell's `[compression]` values and no sweep."""
    compression = dataclasses.replace(profile.compression, ratio=cell.ratio, allocator=cell.allocator.name,
                                      allocator_options=copy.deepcopy(cell.allocator.options),
                                      sequential=cell.sequential, update=cell.update)
    output = dataclasses.replace(profile.output, dir=str(Path(output_dir) / cell.name))
    return dataclasses.replace(profile, name=f"{profile.name}-{cell.name}", compression=compression, output=output,
                               sweep=None)


# --------------------------------------------------------------------------- checking


def _listed(c: Checker, table: dict, key: str, example: str) -> list[Any] | None:
    """The list under `key` (None when the key is left out); a bad shape is reported."""
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else repr(value)
        c.add(f"sweep.{key}", f"expected a non-empty list of values, got {got}", f"{key} = {example}")
        return None
    return value


def _unique(c: Checker, key: str, shown: list[tuple[int, str]]) -> bool:
    """Report a value listed twice (`shown`: (index in the list, value as text)); True when none is."""
    seen: set[str] = set()
    for i, text in shown:
        if text in seen:
            c.add(f"sweep.{key}[{i}]", f"{text} is listed twice; every cell must differ", "each value once")
        seen.add(text)
    return len(seen) == len(shown)


def _ratios(c: Checker, table: dict, base: float) -> tuple[float, ...]:
    values = _listed(c, table, "ratio", "[0.2, 0.3, 0.4, 0.5]")
    if values is None:
        return (base,)
    ratios = []
    for i, value in enumerate(values):
        if not is_number(value) or not 0 <= value < 1:  # also NaN
            message = f"{value!r} is outside [0, 1)" if is_number(value) else f"expected a number, got {value!r}"
            c.add(f"sweep.ratio[{i}]", message, "numbers in [0, 1): the fraction of targeted parameters removed")
            continue
        ratios.append((i, float(value)))
    # compared as the folder names print them: 0.3 and 0.3000001 would share a folder
    if not _unique(c, "ratio", [(i, f"{r:g}") for i, r in ratios]):
        return tuple(dict.fromkeys(r for _, r in ratios))
    return tuple(r for _, r in ratios) or (base,)


def _option_values(c: Checker, table: dict, key: str, option: Any, example: str, base: Any) -> tuple[Any, ...]:
    values = _listed(c, table, key, example)
    if values is None:
        return (base,)
    checked = []
    for i, value in enumerate(values):
        value, error = option.check(value)
        if error is None:
            checked.append((i, value))
        else:
            hint = nearest(value, option.choices) if option.choices and isinstance(value, str) else None
            c.add(f"sweep.{key}[{i}]", error, option.describe(), hint)
    _unique(c, key, [(i, repr(v)) for i, v in checked])
    return tuple(dict.fromkeys(v for _, v in checked)) or (base,)


def _default_label(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> str:
    changed = [f"{k}{v:g}" if is_number(v) else f"{k}-{v}" for k, v in options.items() if defaults.get(k) != v]
    return "-".join([name, *changed]).replace(" ", "")


def _allocator(c: Checker, i: int, entry: Any, registry: Any, compression: Any) -> SweepAllocator | None:
    key = f"sweep.allocator[{i}]"
    names = sorted(registry.allocators)
    allowed = ", ".join(names) or "none installed"
    if isinstance(entry, str):
        name, given, label = entry, None, None
    elif isinstance(entry, dict):
        given = dict(entry)
        name, label = given.pop("name", None), given.pop("label", None)
        if not isinstance(name, str):
            c.add(f"{key}.name", "missing: a table in sweep.allocator names its allocator" if name is None
                  else f"expected an allocator name, got {name!r}", allowed)
            return None
        if label is not None and not (isinstance(label, str) and _LABEL.fullmatch(label)):
            c.add(f"{key}.label", f"{label!r} cannot name a folder", "letters, digits and _ . + - "
                  "(starting with a letter or digit), e.g. label = \"drank-b0.5\"")
            label = None
    else:
        c.add(key, f"expected an allocator name or a table, got {entry!r}",
              'a name, or {name = "drank-rebalanced", beta = 0.5, label = "drank-b0.5"}')
        return None
    allocator = registry.allocators.get(name)
    if allocator is None:
        c.add(f"{key}.name" if given is not None else key, f"unknown allocator {name!r}", allowed, nearest(name, names))
        return None
    defaults, _ = validate_options(allocator.options, {}, file=c.file, key_prefix=key)
    if given is None:  # a name alone: labelled by its name
        options = copy.deepcopy(compression.allocator_options if name == compression.allocator else defaults)
        label = name
    else:
        options, problems = validate_options(allocator.options, given, file=c.file, key_prefix=key)
        c.extend(problems)
    return SweepAllocator(name, label or _default_label(name, options, defaults), options)


def _allocators(c: Checker, table: dict, registry: Any, compression: Any) -> tuple[SweepAllocator, ...]:
    example = '["uniform", "drank", {name = "drank-rebalanced", beta = 0.5, label = "drank-b0.5"}]'
    entries = _listed(c, table, "allocator", example)
    if entries is None:
        entries = [compression.allocator]
    chosen = [_allocator(c, i, e, registry, compression) for i, e in enumerate(entries)]
    labels: dict[str, int] = {}
    for i, entry in enumerate(chosen):
        if entry is None:
            continue
        if entry.label in labels:
            c.add(f"sweep.allocator[{i}]", f"label {entry.label!r} is also sweep.allocator[{labels[entry.label]}]'s; "
                  "the cells would share a folder", 'a distinct label = "..." in each table')
        labels.setdefault(entry.label, i)
    return tuple(a for a in chosen if a is not None)


def check_sweep(c: Checker, value: Any, registry: Any, compression: Any,
                signals: dict[str, dict[str, Any]]) -> tuple[Sweep | None, dict[str, dict[str, Any]]]:
    """The `[sweep]` table checked (problems into `c`), and the resolved options of the signals its
    allocators need beyond `signals` (defaults: a `[signals.<name>]` table, if any, is in `signals`)."""
    from workbench.profile.schema import SECTIONS  # schema imports this module

    if value is None:
        return None, {}
    table = c.table(value, "sweep", "[sweep]")
    if not table:
        if isinstance(value, dict):
            c.add("sweep", "an empty [sweep] sweeps nothing; list values or leave the table out", SWEEP_ALLOWED)
        return None, {}
    options = {o.name: o for o in SECTIONS["compression"]}
    for key in table:
        if key in SWEEPABLE:
            continue
        if key in options:
            c.add(f"sweep.{key}", f"compression.{key} cannot be swept: every cell shares one calibration"
                  if key != "allocator_options" else "allocator options go inside sweep.allocator entries",
                  SWEEP_ALLOWED)
        else:
            c.add(f"sweep.{key}", "unknown key", ", ".join(SWEEPABLE), nearest(key, list(SWEEPABLE)))
    sweep = Sweep(
        ratios=_ratios(c, table, compression.ratio),
        allocators=_allocators(c, table, registry, compression),
        sequential=_option_values(c, table, "sequential", options["sequential"], "[false, true]",
                                  compression.sequential),
        update=_option_values(c, table, "update", options["update"], '["none", "closed-form"]', compression.update),
        given=tuple(k for k in SWEEPABLE if k in table),
    )
    registered = getattr(registry, "signals", {})
    extra = {}
    for name in sweep.needed_signals(registry):
        if name in signals:
            continue
        if name not in registered:
            c.add("sweep.allocator", f"an allocator of the sweep needs the signal {name!r}, which no installed "
                  "plugin registers", ", ".join(sorted(registered)) or "none installed")
            continue
        extra[name], _ = validate_options(registered[name].options, {}, file=c.file, key_prefix=f"signals.{name}")
    for name in sweep.needed_signals(registry):
        if len(sweep.ratios) > 1 and getattr(registered.get(name), "depends_on_target", False):
            users = [a.name for a in sweep.allocators if name in getattr(registry.allocators[a.name], "needs", ())]
            c.add("sweep.ratio", f"the signal {name!r} (needed by {', '.join(dict.fromkeys(users))}) is computed for "
                  "one ratio, so a sweep cannot share it across several", f"one ratio in a sweep with "
                  f"{', '.join(dict.fromkeys(users))}, or those allocators in a separate sweep or run per ratio")
    return sweep, extra
