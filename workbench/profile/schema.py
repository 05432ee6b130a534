"""Run profiles: TOML files parsed into validated dataclasses with every default filled in.

A profile has the sections `[model]`, `[calibration]`, `[compression]` (with
`[compression.allocator_options]`), `[[evaluate]]`, `[output]`, `[signals.<name>]` (one table per
signal, e.g. `[signals.fisher]`), `[recovery]` (LoRA training after compression) and `[sweep]` (several
values of a few compression keys, one run each: workbench/profile/sweep.py), plus optional top-level `name` and `description`; `SECTIONS`
declares their keys and defaults. Allocator, evaluator and signal options are checked against what
the registered plugin declares.

Bad input never escapes as a traceback: every problem in the profile is collected in one pass and
raised together as one `ProfileError`, each `Problem` naming the file, the dotted key
(`compression.ratio`, `evaluate[1].max_windows`; arrays of tables count from 0), the line, what is
allowed and, for a misspelling, the nearest valid name.

Relative paths in a profile (`model.source`, `calibration.dataset`, `output.dir`) are relative to
the current working directory, not to the profile file, like paths typed on the command line. The
resolved profile keeps the user's strings as written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from workbench.errors import Problem, ProfileError
from workbench.sources.files import file_problem
from workbench.api import Option, nearest, validate_options
from workbench.profile.sweep import Sweep, check_sweep
from workbench.profile.checks import (
    DATASET_ALLOWED,
    GROUP_SIZE_ALLOWED,
    PATTERNS_ALLOWED,
    SOURCE_ALLOWED,
    Checker,
    check_dataset,
    check_device,
    check_group_size,
    check_patterns,
    check_source,
    decode_problem,
    is_number,
    path_kind,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The keys of each section. Options carry the defaults and the help the app shows; keys in _BY_HAND
# have shapes Option cannot express and are checked by hand below.
# Chosen on held-out text (BENCHMARKS.md, "Allocators"): 3× lower perplexity than uniform at 20%.
DEFAULT_ALLOCATOR = "loss-aware"
MAX_PROFILE_BYTES = 4 << 20  # a profile is a few kB; anything this large is the wrong file

SECTIONS: dict[str, tuple[Option, ...]] = {
    "model": (
        Option("source", str, "embedded:smollm2-135m", f"the model: {SOURCE_ALLOWED}"),
        Option("dtype", str, "float32", "weights dtype", choices=("float32", "bfloat16", "float16")),
        Option("device", str, "auto", "auto, cpu, cuda or cuda:N"),
        Option("offload", str, "auto", "where decoder layers' weights wait between uses: none (on the device), cpu "
               "(host memory), disk (read layer by layer from the safetensors files), auto (the least that fits; "
               "docs/scaling.md, Offload)", choices=("none", "cpu", "disk", "auto")),
    ),
    "calibration": (
        Option("dataset", str, "embedded:wiki-vital", f"calibration text: {DATASET_ALLOWED}"),
        Option("samples", int, 32, "number of calibration sequences", min=1),
        Option("seq_len", int, 512, "tokens per calibration sequence", min=8),
        Option("seed", int, 0, "seed for sampling the calibration text", min=0, max=2**32 - 1),
        Option("batch_size", int, 8, "sequences captured and moved together; each layer runs over whole "
               "sequences of at most 1,024 tokens at a time whatever this is (docs/scaling.md)", min=1),
    ),
    "compression": (
        Option("ratio", float, 0.2, "fraction of the targeted linear parameters removed, in [0, 1)"),
        Option("allocator", str, DEFAULT_ALLOCATOR, "the registered allocator that picks ranks"),
        Option("group_size", int, None, f"layers sharing one basis: {GROUP_SIZE_ALLOWED}"),
        Option("targets", list, None, f"what to compress (default: the adapter's choice): {PATTERNS_ALLOWED}"),
        Option("ignore", list, [], f"what to leave dense: {PATTERNS_ALLOWED}"),
        Option("whitening", str, "cholesky", "how the Gram matrix is factored", choices=("cholesky", "eigen")),
        Option("gram_precision", str, "auto", "how the Gram products are computed (docs/speed.md)",
               choices=("float64", "float32-equilibrated", "auto")),
        Option("allocator_options", dict, {}, "options of the chosen allocator"),
        Option("sequential", bool, False, "after allocation, re-factor each one-layer group from the compressed "
               "model's own inputs (dense outputs stay the target; ranks unchanged)"),
        Option("update", str, "none", "refit each low-rank layer's output factor Q in closed form against the "
               "dense outputs", choices=("none", "closed-form")),
        Option("ridge", float, 1e-6, "smallest ridge of the compensate stage's fits, relative to the mean "
               "diagonal of P·Ĝ·Pᵀ (the fits shrink toward the allocated factors)", min=0.0),
        Option("holdout", float, 0.25, "share of the calibration windows held out by the compensate stage to "
               "choose the ridge and to accept each change (0: fit and judged on all windows)", min=0.0, max=0.5),
    ),
    "output": (
        Option("dir", str, None, "output directory (default: runs/<profile file stem>)"),
        Option("save_model", bool, True, "save the compressed model next to report.json"),
    ),
    # LoRA training of the low-rank factors after compression, merged back into them (docs/compensation.md).
    "recovery": (
        Option("method", str, "none", "train the compressed model after compression: none or lora (peft)",
               choices=("none", "lora")),
        Option("rank", int, 8, "LoRA rank of each adapter", min=1),
        Option("alpha", float, 16.0, "LoRA alpha: the adapters are scaled by alpha / rank", min=0.0),
        Option("dropout", float, 0.0, "LoRA dropout", min=0.0, max=0.9),
        Option("steps", int, 100, "optimizer steps", min=1),
        Option("lr", float, 1e-4, "AdamW learning rate", min=0.0),
        Option("batch_size", int, 4, "training windows per step", min=1),
        Option("seq_len", int, 256, "tokens per training window", min=8),
        Option("dataset", str, "embedded:wiki-vital", f"training text (its calibration split; never the "
               f"evaluation split): {DATASET_ALLOWED}"),
        Option("seed", int, 0, "seed for the training windows, the adapters' initialisation and dropout",
               min=0, max=2**32 - 1),
        Option("targets", list, ["coef", "basis"], "which factors get adapters: \"coef\" (Q), \"basis\" (P; "
               "a basis shared by a group gets one adapter)"),
        Option("checkpoint_every", int, 25, "checkpoint the training every this many steps", min=1),
    ),
}
TOP_LEVEL = (
    Option("name", str, None, "profile name (default: the file stem)"),
    Option("description", str, "", "a line about what this profile is for"),
)
_BY_HAND = frozenset({"ratio", "group_size", "targets", "ignore", "allocator_options"})
_TOP_ALLOWED = ("name, description, [model], [calibration], [compression], [[evaluate]], [output], "
                "[signals.<name>], [recovery], [sweep]")
RECOVERY_TARGETS = ("coef", "basis")
# Allocator options that became a signal's: refused with where they live now (no silent reinterpretation).
MOVED_ALLOCATOR_OPTIONS = {"fisher_windows": ("fisher", "windows")}


# --------------------------------------------------------------------------- the resolved profile


@dataclass(frozen=True)
class ModelSection:
    source: str
    dtype: str
    device: str
    offload: str = "auto"  # "none", "cpu", "disk" or "auto" (workbench/engine/offload.py, choose_offload)


@dataclass(frozen=True)
class CalibrationSection:
    dataset: str
    samples: int
    seq_len: int
    seed: int
    batch_size: int = 8


@dataclass(frozen=True)
class CompressionSection:
    ratio: float
    allocator: str
    group_size: int | dict[str, int] | None  # None (or a type the table leaves out): the adapter's default
    targets: list[str] | None  # None: the adapter's defaults
    ignore: list[str]
    whitening: str
    allocator_options: dict[str, Any]
    gram_precision: str = "auto"  # "float64", "float32-equilibrated" or "auto" (per device: docs/speed.md)
    sequential: bool = False  # the compensate stage re-factors one-layer groups from the compressed stream
    update: str = "none"  # "none" or "closed-form": the compensate stage refits Q (docs/compensation.md)
    ridge: float = 1e-6  # the compensate stage's smallest ridge, relative to mean diag(P·Ĝ·Pᵀ)
    holdout: float = 0.25  # share of calibration windows the compensate stage holds out to choose λ and judge


@dataclass(frozen=True)
class EvaluateEntry:
    evaluator: str
    options: dict[str, Any]  # resolved: the evaluator's defaults filled in


@dataclass(frozen=True)
class OutputSection:
    dir: str
    save_model: bool


@dataclass(frozen=True)
class RecoverySection:
    """`[recovery]`: LoRA training after compression (workbench/engine/recovery.py); method "none" skips it."""

    method: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 256
    dataset: str = "embedded:wiki-vital"
    seed: int = 0
    targets: list[str] = field(default_factory=lambda: ["coef", "basis"])
    checkpoint_every: int = 25


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    # Where it was loaded from; provenance, not content, so it takes no part in equality.
    path: str | None = field(compare=False)
    model: ModelSection
    calibration: CalibrationSection
    compression: CompressionSection
    evaluate: list[EvaluateEntry]
    output: OutputSection
    # {signal name: resolved options} for the signals the allocator needs and those the profile sets.
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    recovery: RecoverySection = field(default_factory=RecoverySection)
    sweep: Sweep | None = None  # `[sweep]`: one run per combination of its values (workbench/profile/sweep.py)

    def to_dict(self) -> dict[str, Any]:
        """The resolved profile as plain data; None values are left out, so it is valid TOML."""
        data = {
            "name": self.name,
            "description": self.description,
            "model": dataclasses.asdict(self.model),
            "calibration": dataclasses.asdict(self.calibration),
            "compression": dataclasses.asdict(self.compression),
            "evaluate": [{"evaluator": e.evaluator, **copy.deepcopy(e.options)} for e in self.evaluate],
            "output": dataclasses.asdict(self.output),
        }
        if self.signals:
            data["signals"] = copy.deepcopy(self.signals)
        if self.recovery != RecoverySection():  # all defaults (off): left out, so old profiles read as before
            data["recovery"] = dataclasses.asdict(self.recovery)
        if self.sweep is not None:
            data["sweep"] = self.sweep.to_dict()
        return _drop_none(data)

    def to_toml(self) -> str:
        """TOML text that parses back (with the same plugins) to an equal Profile."""
        doc = tomlkit.document()
        doc.add(tomlkit.comment("Resolved workbench profile: every default filled in."))
        doc.update(self.to_dict())
        return tomlkit.dumps(doc)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


# --------------------------------------------------------------------------- checking


def _check_compression(c: Checker, given: dict, registry: Any) -> CompressionSection:
    v = c.section(given, "compression", SECTIONS["compression"], _BY_HAND)
    ratio = v["ratio"]
    if not is_number(ratio) or not 0 <= ratio < 1:  # `not 0 <= x < 1` also rejects nan
        message = f"{ratio!r} is outside [0, 1)" if is_number(ratio) else f"expected a number, got {ratio!r}"
        c.add("compression.ratio", message, "number in [0, 1): the fraction of targeted parameters removed")
        ratio = 0.2
    targets = v["targets"]
    if targets == []:
        message = "an empty list compresses nothing; leave the key out for the adapter's defaults"
        c.add("compression.targets", message, PATTERNS_ALLOWED)
    elif targets is not None:
        targets = check_patterns(c, targets, "compression.targets")
    ignore = check_patterns(c, v["ignore"], "compression.ignore")
    group_size = check_group_size(c, v["group_size"])

    key = "compression.allocator_options"
    given_options = dict(c.table(v["allocator_options"], key, "[compression.allocator_options]"))
    allocator = registry.allocators.get(v["allocator"])
    if allocator is None:
        names = sorted(registry.allocators)
        allowed = ", ".join(names) or "none installed"
        c.add("compression.allocator", f"unknown allocator {v['allocator']!r}", allowed, nearest(v["allocator"], names))
        options = dict(given_options)
    else:
        declared = {o.name for o in allocator.options}
        for old, (signal, new) in MOVED_ALLOCATOR_OPTIONS.items():
            if old in given_options and old not in declared:
                del given_options[old]
                c.add(f"{key}.{old}", f"moved: the option is now the signal's, [signals.{signal}] {new}",
                      f"[signals.{signal}]\n{new} = ...", f"signals.{signal}.{new}")
        options, problems = validate_options(allocator.options, given_options, file=c.file, key_prefix=key)
        c.extend(problems)
    return CompressionSection(float(ratio), v["allocator"], group_size, targets, ignore, v["whitening"], options,
                              v["gram_precision"], v["sequential"], v["update"], float(v["ridge"]),
                              float(v["holdout"]))


def _check_recovery(c: Checker, given: dict) -> RecoverySection:
    v = c.section(given, "recovery", SECTIONS["recovery"])
    check_dataset(c, v["dataset"], "recovery.dataset")
    targets = v["targets"]
    allowed = 'a non-empty list of "coef" and/or "basis"'
    if not targets or not all(isinstance(t, str) for t in targets):
        c.add("recovery.targets", f"expected {allowed}, got {targets!r}", allowed)
        targets = ["coef"]
    for t in targets:
        if t not in RECOVERY_TARGETS:
            c.add("recovery.targets", f"unknown factor {t!r}", allowed, nearest(t, list(RECOVERY_TARGETS)))
    v["targets"] = list(dict.fromkeys(targets))
    if v["lr"] == 0:
        c.add("recovery.lr", "a learning rate of 0 trains nothing", "a number > 0, e.g. 1e-4")
    return RecoverySection(**{**v, "alpha": float(v["alpha"]), "dropout": float(v["dropout"]), "lr": float(v["lr"])})


def _check_signals(c: Checker, value: Any, registry: Any, allocator: str) -> dict[str, dict[str, Any]]:
    """`[signals.<name>]` tables against the registered signals; the allocator's `needs` must be registered.

    Returns the resolved options (defaults filled) of every signal the allocator needs or the profile sets.
    """
    registered = getattr(registry, "signals", {})
    allowed = ", ".join(sorted(registered)) or "none installed"
    given = c.table(value, "signals", "[signals.<name>]")
    chosen = getattr(registry.allocators.get(allocator), "needs", ())
    for name in chosen:
        if name not in registered:
            c.add("compression.allocator", f"allocator {allocator!r} needs the signal {name!r}, which no installed "
                                           f"plugin registers", allowed, nearest(name, list(registered)))
    resolved = {}
    for name in [*chosen, *(n for n in given if n not in chosen)]:
        if name not in registered:
            if name in given:
                c.add(f"signals.{name}", f"unknown signal {name!r}", allowed, nearest(name, list(registered)))
            continue
        options = c.table(given.get(name, {}), f"signals.{name}", f"[signals.{name}]")
        resolved[name], problems = validate_options(registered[name].options, options, file=c.file,
                                                    key_prefix=f"signals.{name}")
        c.extend(problems)
    return resolved


def _check_evaluate(c: Checker, value: Any, registry: Any) -> list[EvaluateEntry]:
    names = sorted(registry.evaluators)
    allowed = ", ".join(names) or "none installed"
    if not isinstance(value, list):
        got = "[evaluate] (one table)" if isinstance(value, dict) else repr(value)
        c.add("evaluate", f"expected [[evaluate]] tables, got {got}", "one [[evaluate]] table per evaluator")
        return []
    entries = []
    for i, item in enumerate(value):
        key = f"evaluate[{i}]"
        if not isinstance(item, dict):
            c.add(key, f"expected a table with an 'evaluator' key, got {item!r}", allowed)
            continue
        given = dict(item)
        name = given.pop("evaluator", None)
        if name is None:
            c.add(f"{key}.evaluator", "missing: each [[evaluate]] table must name its evaluator", allowed)
        elif not isinstance(name, str) or name not in registry.evaluators:
            hint = nearest(name, names) if isinstance(name, str) else None
            c.add(f"{key}.evaluator", f"unknown evaluator {name!r}", allowed, hint)
        else:
            options, problems = validate_options(registry.evaluators[name].options, given, file=c.file, key_prefix=key)
            c.extend(problems)
            entries.append(EvaluateEntry(name, options))
    return entries


def _check_top_level(c: Checker, data: dict) -> None:
    """Report unknown top-level keys, suggesting the section a stray key belongs to."""
    known = [o.name for o in TOP_LEVEL] + [*SECTIONS, "evaluate", "signals", "sweep"]
    for name, value in data.items():
        if name in known:
            continue
        if isinstance(value, dict):
            c.add(name, "unknown section", _TOP_ALLOWED, nearest(name, [*SECTIONS, "evaluate", "sweep"]))
            continue
        home = next((s for s, options in SECTIONS.items() if any(o.name == name for o in options)), None)
        if home:
            c.add(name, f"unknown top-level key (it belongs in [{home}])", _TOP_ALLOWED, f"{home}.{name}")
        else:
            c.add(name, "unknown top-level key", _TOP_ALLOWED, nearest(name, known))


def _stem(file: str) -> str:
    return "profile" if file.startswith("<") else Path(file).stem or "profile"


# --------------------------------------------------------------------------- public API


def parse_profile(text: str, file: str = "<profile>", registry: Any = None) -> Profile:
    """Parse and validate profile text; raise ProfileError listing every problem found.

    `file` is only used in messages and for the defaults of `name` and `output.dir`.
    `registry` is anything with `.allocators` and `.evaluators` (and `.signals`) dicts (default: the
    loaded plugins).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError([decode_problem(exc, text, file)]) from None
    except RecursionError:  # tomllib parses nested arrays/tables recursively
        raise ProfileError([Problem(file, "", "invalid TOML: arrays or inline tables nested too deeply",
                                    allowed="a profile nests values a few levels at most")]) from None
    except ValueError as exc:  # Python's own limits, e.g. an integer of more than 4300 digits
        message = str(exc).split("; use sys.")[0]  # the hint about sys.set_int_max_str_digits is not for users
        raise ProfileError([Problem(file, "", f"invalid TOML: {message}", allowed="TOML syntax (https://toml.io)")]) from None
    if registry is None:
        from workbench.registry import get_registry

        registry = get_registry()

    c = Checker(file, text)
    _check_top_level(c, data)
    top = c.section({k: v for k, v in data.items() if k in ("name", "description")}, "", TOP_LEVEL)
    sections = {s: c.table(data.get(s, {}), s, f"[{s}]") for s in SECTIONS}

    model = c.section(sections["model"], "model", SECTIONS["model"])
    check_source(c, model["source"])
    check_device(c, model["device"])

    calibration = c.section(sections["calibration"], "calibration", SECTIONS["calibration"])
    check_dataset(c, calibration["dataset"], "calibration.dataset")

    compression = _check_compression(c, sections["compression"], registry)
    evaluate = _check_evaluate(c, data.get("evaluate", []), registry)
    signals = _check_signals(c, data.get("signals", {}), registry, compression.allocator)
    recovery = _check_recovery(c, sections["recovery"])
    sweep, sweep_signals = check_sweep(c, data.get("sweep"), registry, compression, signals)
    signals = {**signals, **sweep_signals}  # each signal a swept allocator needs, computed once for all cells

    output = c.section(sections["output"], "output", SECTIONS["output"])
    if output["dir"] is None:
        output["dir"] = f"runs/{_stem(file)}"
    elif not output["dir"].strip():
        c.add("output.dir", "must not be empty", "a directory path (relative to the current directory)")

    if c.problems:
        # Top to bottom, as the user reads the file; problems without a line last.
        raise ProfileError(sorted(c.problems, key=lambda p: (p.line is None, p.line or 0)))
    return Profile(
        name=top["name"] if top["name"] is not None else _stem(file),
        description=top["description"],
        path=None,
        model=ModelSection(**model),
        calibration=CalibrationSection(**calibration),
        compression=compression,
        evaluate=evaluate,
        output=OutputSection(**output),
        signals=signals,
        recovery=recovery,
        sweep=sweep,
    )


def load_profile(path: str | os.PathLike, registry: Any = None) -> Profile:
    """Read and parse a profile file; an unreadable file is a ProfileError with one Problem."""
    file = os.fspath(path)
    problem = file_problem(file)  # a FIFO would hang and /dev/zero never end: refused before opening
    if problem and problem != "file not found":
        raise ProfileError([Problem(file, "", problem, allowed="a .toml file")])
    with contextlib.suppress(OSError):
        if os.path.getsize(file) > MAX_PROFILE_BYTES:
            raise ProfileError([Problem(file, "", f"{os.path.getsize(file):,} bytes: far too large for a profile "
                                                  f"(at most {MAX_PROFILE_BYTES:,}); is it the right file?")])
    try:
        text = Path(file).read_text(encoding="utf-8-sig")  # -sig: tolerate an editor's BOM
    except FileNotFoundError:
        problem = Problem(file, "", "file not found", allowed="an existing .toml file", suggestion=_sibling(file))
        raise ProfileError([problem]) from None
    except IsADirectoryError:
        raise ProfileError([Problem(file, "", "is a directory, not a profile file", allowed="a .toml file")]) from None
    except UnicodeDecodeError as exc:
        raise ProfileError([Problem(file, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except (OSError, ValueError) as exc:
        raise ProfileError([Problem(file, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}")]) from None
    return dataclasses.replace(parse_profile(text, file, registry), path=file)


def _sibling(file: str) -> str | None:
    """For a mistyped profile path: the closest .toml file in the same directory."""
    folder = Path(file).parent
    try:
        names = [p.name for p in folder.glob("*.toml")]
    except (OSError, ValueError):
        return None
    hit = nearest(Path(file).name, names)
    return str(folder / hit) if hit else None


def validate_profile(source: str | os.PathLike, registry: Any = None) -> list[Problem]:
    """Problems with a profile ([] when it is fine).

    `source` is a path (a PathLike, or a one-line string naming a .toml or existing file) or TOML text.
    """
    is_path = isinstance(source, os.PathLike) or (
        "\n" not in source and (source.strip().endswith(".toml") or path_kind(source) == "file")
    )
    try:
        if is_path:
            load_profile(source, registry)
        else:
            parse_profile(source, registry=registry)
    except ProfileError as exc:
        return exc.problems
    return []
