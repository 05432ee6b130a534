"""The one public module for plugins: everything a plugin needs from workbench is importable from here.

The types (options, allocator input, adapter sites, evaluators) are defined here; `hookimpl`, the
error types, the budget helpers, `LowRankLinear`, evaluation text and tokens, memory readings and
the adapter lookup are re-exported (see `__all__`). Built-in plugins import nothing else from
workbench; if one needs more, this module is what changes. Importing it does not import torch:
the heavy names load on first use.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from workbench.errors import PluginError, Problem, RunFailed, UsageError, WorkbenchError
from workbench.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from workbench.events import EventBus


# --------------------------------------------------------------------------- options

_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}


@dataclass(frozen=True)
class Option:
    """One option a plugin accepts, declared so profiles and the app can validate and show it."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        if self.choices:
            return " | ".join(repr(c) for c in self.choices)
        text = _TYPE_NAMES.get(self.type, self.type.__name__)
        if self.min is not None and self.max is not None:
            text += f" in [{self.min}, {self.max}]"
        elif self.min is not None:
            text += f" >= {self.min}"
        elif self.max is not None:
            text += f" <= {self.max}"
        return text

    def check(self, value: Any) -> tuple[Any, str | None]:
        """Return (coerced value, error message or None)."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is bool and not isinstance(value, bool):
            return value, f"expected a boolean, got {value!r}"
        if self.type in (int, float) and isinstance(value, bool):
            return value, f"expected {_TYPE_NAMES[self.type]}, got {value!r}"
        if not isinstance(value, self.type):
            return value, f"expected {_TYPE_NAMES.get(self.type, self.type.__name__)}, got {value!r}"
        if isinstance(value, float) and value != value:  # NaN passes every `<`/`>` bound check below
            return value, f"expected {_TYPE_NAMES.get(self.type, 'a number')}, got nan"
        if self.choices is not None and value not in self.choices:
            return value, f"{value!r} is not one of the choices"
        if self.min is not None and value < self.min:
            return value, f"{value!r} is below the minimum {self.min}"
        if self.max is not None and value > self.max:
            return value, f"{value!r} is above the maximum {self.max}"
        return value, None


def nearest(name: str, candidates: Sequence[str]) -> str | None:
    """The closest valid name for a misspelling, or None."""
    hits = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return hits[0] if hits else None


def validate_options(
    declared: Sequence[Option],
    given: Mapping[str, Any],
    *,
    file: str,
    key_prefix: str,
    lines: Mapping[str, int] | None = None,
) -> tuple[dict[str, Any], list[Problem]]:
    """Check `given` against `declared`; return the resolved options (defaults filled) and problems.

    `lines` maps a full dotted key to its line number where the caller knows it.
    """
    lines = lines or {}
    by_name = {o.name: o for o in declared}
    resolved = {o.name: o.default for o in declared}
    problems: list[Problem] = []
    for name, value in given.items():
        key = f"{key_prefix}.{name}" if key_prefix else name
        option = by_name.get(name)
        if option is None:
            allowed = ", ".join(sorted(by_name)) or "no options"
            problems.append(
                Problem(file, key, "unknown option", lines.get(key), allowed, nearest(name, list(by_name)))
            )
            continue
        coerced, error = option.check(value)
        if error:
            problems.append(Problem(file, key, error, lines.get(key), option.describe()))
        else:
            resolved[name] = coerced
    return resolved, problems


class Plugin:
    """Common shape of everything a plugin registers: a name, a line of text, declared options."""

    name: str = ""
    description: str = ""
    options: tuple[Option, ...] = ()


# --------------------------------------------------------------------------- allocators


def break_even_rank(in_features: int, out_features: int, n: int) -> int:
    """Largest useful rank of n layers (in → out each) sharing one basis: the SVD's rank bound,
    capped where a factorization, r·(in + n·out) parameters, stops being smaller than n·in·out.
    """
    return min(in_features, n * out_features, n * in_features * out_features // (in_features + n * out_features))


@dataclass
class GroupSpectrum:
    """What an allocator knows about one group: one matrix type over `layers`, sharing a basis."""

    key: str  # stable id, e.g. "q_proj@0-1"
    matrix_type: str  # e.g. "q_proj"
    layers: tuple[int, ...]
    in_features: int
    out_features: int  # per layer
    singular_values: "torch.Tensor"  # float64, descending, of the whitened group matrix W_g L_g
    sensitivity: Mapping[str, Any] = field(default_factory=dict)  # optional extra signals

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def omega(self) -> int:
        """Parameters per retained rank: one shared P row plus one Q column per layer."""
        return self.in_features + self.n * self.out_features

    @property
    def dense_params(self) -> int:
        return self.n * self.in_features * self.out_features

    @property
    def max_rank(self) -> int:
        """Largest rank that is still useful: the SVD's rank bound, capped at break-even.

        At or past n·in·out/ω a factorization stores more than the dense weights, so the engine
        keeps the layers dense there (costing exactly the dense parameters).
        """
        return break_even_rank(self.in_features, self.out_features, self.n)

    @property
    def effective_rank(self) -> float:
        import torch

        s2 = self.singular_values.double() ** 2
        total = s2.sum()
        if total <= 0:
            return 1.0
        p = s2 / total
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    def loss_at(self, k: int) -> float:
        """Whitened truncation loss Σ_{i>k} σ_i² when keeping k components."""
        return float((self.singular_values.double()[k:] ** 2).sum())


class Allocation(dict):
    """An allocator's answer with notes: {group.key: rank} plus `notes` for report.json.

    A plain dict of ranks is a complete answer; return an Allocation when the run's report should
    also say something about how the ranks came about (e.g. which matrix types fell back).
    `notes` must be JSON-serialisable.
    """

    def __init__(self, ranks: Mapping[str, int] = (), notes: Mapping[str, Any] | None = None) -> None:
        super().__init__(ranks)
        self.notes: dict[str, Any] = dict(notes or {})


class Allocator(Plugin):
    """Turns spectra and a parameter budget into integer ranks, one per group.

    `budget` is the number of parameters the targeted layers may keep. A group whose rank is
    `group.max_rank` or more is kept dense and costs `group.dense_params`; otherwise it costs
    `rank * group.omega`. Return {group.key: rank} (or an `Allocation`, which adds notes). The
    engine checks the answer.
    """

    #: Names of registered signals (`Signal.name`, e.g. "fisher") this allocator needs; each is
    #: computed after calibration (extra time) and handed over in `GroupSpectrum.sensitivity[name]`.
    needs: tuple[str, ...] = ()

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> dict[str, int]:
        raise NotImplementedError


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class Site:
    """One compressible matrix type in every decoder layer."""

    matrix_type: str  # e.g. "q_proj"; what profiles name in `targets`
    path: str  # module path inside one decoder layer, e.g. "self_attn.q_proj"
    input_group: str  # sites with the same input group see the same input (and share one Gram)


class Adapter(Plugin):
    """Knows one architecture family: which modules to compress and how they are grouped.

    A subclass must implement `claims`, `decoder_layers` and `sites`; the rest have defaults that
    fit any transformers causal LM whose config names its heads the usual way.
    """

    #: Higher priority adapters are asked first when several could claim a model.
    priority: int = 0

    def claims(self, model: "nn.Module") -> bool:
        """True when this adapter understands `model` (decided from config and modules, never a name)."""
        raise NotImplementedError

    def decoder_layers(self, model: "nn.Module") -> "nn.ModuleList":
        raise NotImplementedError

    def sites(self, model: "nn.Module") -> list[Site]:
        raise NotImplementedError

    def token_wise_modules(self, model: "nn.Module") -> list[str]:
        """Paths inside one decoder layer of modules that act on each token alone (an MLP, not
        attention): calibration runs them over a bounded number of tokens at a time, so their
        activations do not grow with the batch. Default: none."""
        return []

    def default_targets(self, model: "nn.Module") -> list[str]:
        return [s.matrix_type for s in self.sites(model)]

    def default_group_size(self, model: "nn.Module", matrix_type: str) -> int:
        """Layers sharing one basis for `matrix_type` when the profile leaves `group_size` out."""
        return 1

    def head_layout(self, model: "nn.Module") -> dict[str, int]:
        """Attention heads, key/value heads and the size of one head, read from the config."""
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}

    def replace_module(self, root: "nn.Module", path: str, module: "nn.Module") -> "nn.Module":
        """Put `module` at the dotted `path` under `root` (a layer or the model); return the old one."""
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        old = getattr(parent, child)
        setattr(parent, child, module)
        return old

    def build_model(self, config: Any, dtype: "torch.dtype") -> "nn.Module":
        """An untrained model of this architecture, to load a saved compressed model into."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


# --------------------------------------------------------------------------- evaluators


@dataclass
class EvalContext:
    """What an evaluator may use besides the model: where to cache, how to report, when to stop."""

    device: "torch.device"
    events: "EventBus"
    cancel: Any  # workbench.events.CancelToken
    seed: int = 0
    label: str = "dense"  # "dense" or "compressed"


@dataclass
class EvalResult:
    """One measured value. The run pairs the dense and the compressed result per evaluator."""

    dataset: str
    metric: str
    value: float
    details: dict[str, Any] = field(default_factory=dict)


class Evaluator(Plugin):
    #: The dense figure depends only on model, options and this version: cache it across runs.
    cacheable: bool = False
    #: Under torchrun: True runs `evaluate` in every process, each over its `process_share` of the
    #: windows, summed with `all_reduce_sum`; False runs it in process 0 alone (the others get its result).
    distributed: bool = False
    version: str = "1"

    def evaluate(self, model: "nn.Module", tokenizer: Any, options: Mapping[str, Any], ctx: EvalContext) -> EvalResult:
        raise NotImplementedError


# --------------------------------------------------------------------------- signals


@dataclass
class SignalContext:
    """Everything a signal may use: the dense model after calibration and the groups' factors.

    `plans` are the groups (each with `key`, `matrix_type`, `layers`, `in_features`,
    `out_features` and `site.path`, the module path inside a decoder layer); `factors[key]` holds
    the group's `singular_values` (descending), `u` (n·out × r, one block of rows per layer) and
    `vt_linv` (r × in, Vᵀ L⁻¹) truncated at the group's break-even rank. `windows` are the
    calibration token windows (one row each); `options` the signal's declared options, validated,
    defaults filled. Report progress with `events.progress(stage, i, n)` and call `cancel.check()`
    between windows. `budget` / `ratio` are the run's target, `checkpoint` a progress store (below).
    """

    model: "nn.Module"
    adapter: "Adapter"
    plans: Sequence[Any]
    factors: Mapping[str, Any]
    windows: "torch.Tensor"
    device: "torch.device"
    events: "EventBus"
    cancel: Any  # workbench.events.CancelToken
    options: Mapping[str, Any] = field(default_factory=dict)
    stage: str = "sensitivity"  # the progress stage name the run shows
    # The run's target: `ratio` (fraction of the targeted parameters removed) and `budget` (parameters the
    # targeted layers may keep), for signals that train toward it; None where the caller has none.
    budget: int | None = None
    ratio: float | None = None
    # Where a long signal keeps its progress for a resumed run: `save(meta, tensors)` commits (atomically)
    # JSON-able meta and a {name: tensor} dict, `load()` returns the last (meta, tensors) or None.
    # None: nothing is kept (no work directory).
    checkpoint: Any = None
    # The run's plugin registry as a function (kind, name) -> plugin ("signal", "allocator", ...), so that a
    # signal building on another one gets what the profile's names resolve to (a replacement included).
    lookup: Any = None
    # What the signal wants the run's report to say about how it computed (JSON-able), e.g. a setting it
    # resolved from "auto": report.json keeps it as signals.<name>.notes, and a resumed run keeps it too.
    notes: dict[str, Any] = field(default_factory=dict)

    def plugin(self, kind: str, name: str) -> "Plugin":
        """The registered plugin of `kind` called `name`, e.g. `ctx.plugin("allocator", "loss-aware")`."""
        if self.lookup is None:
            raise UsageError(f"no plugin registry here to look up {kind} '{name}': build the SignalContext "
                             "with `lookup=registry.get`")
        return self.lookup(kind, name)

    def signal(self, name: str, options: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
        """Another registered signal's {group key: value} on this context's model, groups and windows.

        `options` are checked against that signal's declared ones (defaults filled); it gets no
        checkpoint (its result is part of the calling signal's work). Its notes, if any, join this
        context's under its name.
        """
        from dataclasses import replace

        plugin = self.plugin("signal", name)
        resolved, problems = validate_options(plugin.options, dict(options or {}), file="<signals>",
                                              key_prefix=f"signals.{name}")
        if problems:
            raise UsageError("; ".join(f"{p.key}: {p.message}" for p in problems))
        inner = replace(self, options=resolved, checkpoint=None, notes={})
        values = plugin.compute(inner)
        if inner.notes:
            self.notes[name] = dict(inner.notes)
        return values

    @contextmanager
    def swapped(self, modules: Mapping[str, "nn.Module"]):
        """Put `modules` ({dotted path under the model: module}) in place for the `with` block.

        The originals are always put back, whatever the block raises; use it for gradient passes
        through temporarily replaced modules (trainable masks, probes).
        """
        replaced: list[tuple[str, Any]] = []
        try:
            for path, module in modules.items():
                replaced.append((path, self.adapter.replace_module(self.model, path, module)))
            yield self.model
        finally:
            for path, original in reversed(replaced):
                self.adapter.replace_module(self.model, path, original)


class Signal(Plugin):
    """A per-group measurement an allocator can ask for by name in `Allocator.needs`.

    `compute(ctx)` returns {group key: value} for every group in `ctx.plans`, usually a float64
    tensor with one value per kept component. Tensors are checkpointed with the signal's options,
    so a resumed run with the same options reuses them. Profiles set the declared `options` in a
    `[signals.<name>]` table.
    """

    #: True when `compute` uses the run's target (`SignalContext.ratio` / `budget`): its result then
    #: holds for one ratio only, so a `[sweep]` over several ratios cannot share it (refused).
    depends_on_target: bool = False

    def compute(self, ctx: SignalContext) -> Mapping[str, Any]:
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers for plugins


def claiming_adapter(model: "nn.Module") -> Adapter | None:
    """The installed adapter that would handle `model` in a run, or None when none claims it."""
    from workbench.registry import get_registry

    try:
        return get_registry().adapter_for(model)
    except WorkbenchError:
        return None


# Re-exported on first use, so importing this module stays torch-free (name -> defining module).
_LAZY = {
    **dict.fromkeys(("rank_cost", "total_cost", "budget_for", "uniform_ranks", "round_to_budget",
                     "fill_to_budget", "trim_to_budget", "fit_to_budget"), "workbench.engine.allocation"),
    "LowRankLinear": "workbench.engine.lowrank",
    **dict.fromkeys(("evaluation_tokens", "wiki_vital_articles", "EMBEDDED_WIKI"), "workbench.sources.text"),
    "peak_memory": "workbench.run.resources",
    **dict.fromkeys(("process_share", "all_reduce_sum"), "workbench.engine.distributed"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench.api' has no attribute '{name}'")
    import importlib

    # Not cached here: the name always resolves to what its home module holds now (a test or a
    # plugin that replaces it there is seen), at the cost of one dict look-up per access.
    return getattr(importlib.import_module(module), name)


__all__ = [
    # hooks and errors
    "hookimpl", "Problem", "WorkbenchError", "UsageError", "RunFailed", "PluginError",
    # options
    "Option", "Plugin", "nearest", "validate_options",
    # allocators and their budget arithmetic
    "Allocator", "Allocation", "GroupSpectrum", "break_even_rank", "rank_cost", "total_cost",
    "budget_for", "uniform_ranks", "round_to_budget", "fill_to_budget", "trim_to_budget", "fit_to_budget",
    # adapters
    "Adapter", "Site", "LowRankLinear", "claiming_adapter",
    # evaluators
    "Evaluator", "EvalContext", "EvalResult", "evaluation_tokens", "wiki_vital_articles", "EMBEDDED_WIKI",
    "peak_memory",
    # signals
    "Signal", "SignalContext",
    # several processes (torchrun): a share of the windows, sums across processes; no-ops in one process
    "process_share", "all_reduce_sum",
]
