"""Which matrices are compressed, and how consecutive layers are grouped to share a basis."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

from torch import nn

from workbench.errors import PluginError, UsageError, blame
from workbench.api import Adapter, Site, break_even_rank, nearest


# The walk's statistic for a group factored from its output's Gram is named `<module path>` + this.
OUTPUT_STATISTIC = ":output"


def output_module(statistic: str) -> str | None:
    """The module path whose output's Gram `statistic` is (`GroupPlan.statistic`), or None for an input group."""
    return statistic[:-len(OUTPUT_STATISTIC)] if statistic.endswith(OUTPUT_STATISTIC) else None


@dataclass(frozen=True)
class GroupPlan:
    key: str  # e.g. "q_proj@0-1"
    site: Site
    layers: tuple[int, ...]
    in_features: int
    out_features: int
    # Factored from the Gram of its own output, YᵀY = W XᵀX Wᵀ, instead of its input's (`output_statistics`)
    output_statistic: bool = False

    @property
    def matrix_type(self) -> str:
        return self.site.matrix_type

    @property
    def statistic(self) -> str:
        """The name of the walk's statistic this group is factored from: its input group's Gram, or
        (`output_statistic`) the Gram of its own output, which no other group shares."""
        return self.site.path + OUTPUT_STATISTIC if self.output_statistic else self.site.input_group


def output_statistics(plans: Sequence[GroupPlan]) -> list[GroupPlan]:
    """`plans`, those of wide one-layer groups marked to be factored from their output's Gram.

    For one layer (n = 1), the whitened SVD A = W L needs G = XᵀX only through A Aᵀ = W G Wᵀ, which
    is YᵀY for the layer's output Y = X Wᵀ: its eigenvectors are A's left singular vectors, its
    eigenvalues the σ², and Ŵ = U_k U_kᵀ W (what V_kᵀL⁻¹ = Σ_k⁻¹U_kᵀW gives) without L. Where out <
    in, that Gram is the smaller one: LLaMA-7B's down_proj 4096² instead of 11008² (0.13 against
    0.97 GB per layer; 7× fewer multiply-adds from a float32 output used as it is, about 0.9× the
    input Gram's where the output is recomputed: docs/architecture.md). Taken for an input read
    only by such groups, when their output Grams together are smaller than the input's; a shared
    basis (n > 1) needs the input Gram (its cross-layer blocks are not any layer's output).
    """
    readers: dict[tuple[str, int], list[GroupPlan]] = {}
    for plan in plans:
        for i in plan.layers:
            readers.setdefault((plan.site.input_group, i), []).append(plan)

    def wide_alone(plan: GroupPlan) -> bool:
        others = readers[(plan.site.input_group, plan.layers[0])]
        return (len(plan.layers) == 1 and all(len(p.layers) == 1 and p.out_features < p.in_features for p in others)
                and sum(p.out_features ** 2 for p in others) < plan.in_features ** 2)

    return [dataclasses.replace(plan, output_statistic=True) if wide_alone(plan) else plan for plan in plans]


def _matches(pattern: str, matrix_type: str, module_name: str) -> bool:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return bool(rx.fullmatch(matrix_type) or rx.fullmatch(module_name))
    return pattern in (matrix_type, module_name)


def module_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    return "layers"


# What a profile's `compression.group_size` may be: one size, a table per matrix type, nothing
# (the adapter's defaults), or a function of the matrix type returning a size or None.
GroupSizes = Union[int, Mapping[str, int], Callable[[str], Union[int, None]], None]


def _size_lookup(group_size: GroupSizes, types: Sequence[str]) -> Callable[[str], int | None]:
    """Turn any GroupSizes into type -> size-or-None; a table naming no matrix type is refused."""
    if callable(group_size):
        return group_size
    if isinstance(group_size, Mapping):
        for name in group_size:
            if name not in types:
                hint = nearest(name, list(types))
                raise UsageError(
                    f"compression.group_size.{name}: '{name}' is not a matrix type of this model"
                    f" (allowed: {', '.join(types)})" + (f"; did you mean '{hint}'?" if hint else "")
                )
        return group_size.get
    return lambda _type: group_size


def group_size_of(model: nn.Module, adapter: Adapter, matrix_type: str, lookup: Callable[[str], int | None]) -> int:
    """The profile's size for `matrix_type` where it sets one, else the adapter's default."""
    size = lookup(matrix_type)
    if size is None:
        with blame(f"adapter '{adapter.name}'", f"giving the default group size of {matrix_type}"):
            size = adapter.default_group_size(model, matrix_type)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise PluginError(f"adapter '{adapter.name}' gave group size {size!r} for {matrix_type};"
                              " expected an integer >= 1")
    return size


def token_wise_paths(model: nn.Module, adapter: Adapter) -> list[str]:
    """The modules the adapter says act on each token alone, checked against every decoder layer."""
    with blame(f"adapter '{adapter.name}'", "naming its token-wise modules"):
        paths = adapter.token_wise_modules(model)
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
        raise PluginError(f"adapter '{adapter.name}' gave token-wise modules {paths!r}; expected a list of module paths")
    for layer in adapter.decoder_layers(model):
        for path in paths:
            try:
                layer.get_submodule(path)
            except AttributeError:
                raise PluginError(f"adapter '{adapter.name}' names the token-wise module {path!r}, which a decoder "
                                  "layer of this model does not have") from None
    return list(paths)


def plan_groups(model: nn.Module, adapter: Adapter, targets: Sequence[str] | None, ignore: Sequence[str],
                group_size: GroupSizes = None, output_grams: bool = True) -> list[GroupPlan]:
    """Groups of up to n consecutive targeted layers per matrix type (the last group may be shorter).

    `group_size` is the profile's `compression.group_size` (or a function of the matrix type);
    wherever it gives no size, the adapter's `default_group_size` applies. `output_grams`: wide
    one-layer groups are factored from their output's Gram (`output_statistics`); False keeps every
    group on its input's Gram (the same factors up to rounding, at a higher cost).
    """
    with blame(f"adapter '{adapter.name}'", "listing the decoder layers and their matrices"):
        layers = adapter.decoder_layers(model)
        sites = adapter.sites(model)
        default_targets = adapter.default_targets(model) if targets is None else None
    prefix = module_prefix(model, layers)
    types = [s.matrix_type for s in sites]
    size_for = _size_lookup(group_size, types)
    targets = list(targets) if targets is not None else list(default_targets)
    for pattern in targets:
        if not pattern.startswith("re:") and pattern not in types and not any(
            pattern == f"{prefix}.{i}.{s.path}" for i in range(len(layers)) for s in sites
        ):
            hint = nearest(pattern, types)
            raise UsageError(
                f"compression.targets: '{pattern}' names no compressible matrix of this model"
                f" (allowed: {', '.join(types)}, module names, or 're:' patterns)"
                + (f"; did you mean '{hint}'?" if hint else "")
            )
    plans: list[GroupPlan] = []
    for site in sites:
        chosen = []
        for i, layer in enumerate(layers):
            name = f"{prefix}.{i}.{site.path}"
            if any(_matches(p, site.matrix_type, name) for p in targets) and not any(
                _matches(p, site.matrix_type, name) for p in ignore
            ):
                chosen.append(i)
        if not chosen:
            continue
        size = group_size_of(model, adapter, site.matrix_type, size_for)
        # Only consecutive layers share a basis: split the chosen layers into runs first.
        runs, run = [], [chosen[0]]
        for i in chosen[1:]:
            if i == run[-1] + 1:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        for run in runs:
            for start in range(0, len(run), size):
                group = tuple(run[start:start + size])
                linear = layers[group[0]].get_submodule(site.path)
                key = f"{site.matrix_type}@{group[0]}" + (f"-{group[-1]}" if len(group) > 1 else "")
                plans.append(GroupPlan(key, site, group, linear.in_features, linear.out_features))
    if not plans:
        raise UsageError("compression.targets/ignore leave nothing to compress")
    return output_statistics(plans) if output_grams else plans


def reachable_ratio(plans: Sequence[GroupPlan]) -> float:
    """The largest `compression.ratio` an allocation can reach: every group kept at rank 1.

    Allocators give each group a rank of at least 1, costing in + n·out parameters (or the dense
    n·in·out where that is no larger), so no budget below that sum can be met.
    """
    dense = sum(len(p.layers) * p.in_features * p.out_features for p in plans)
    return 1.0 - rank_one_cost(plans) / dense if dense else 0.0


def rank_one_cost(plans: Sequence[GroupPlan]) -> int:
    total = 0
    for p in plans:
        n, dense = len(p.layers), len(p.layers) * p.in_features * p.out_features
        total += dense if break_even_rank(p.in_features, p.out_features, n) <= 1 else p.in_features + n * p.out_features
    return total


def unmatched_patterns(model: nn.Module, adapter: Adapter, patterns: Sequence[str]) -> list[str]:
    """The patterns (of `compression.ignore`) that name no matrix of this model: likely a typo."""
    with blame(f"adapter '{adapter.name}'", "listing the decoder layers and their matrices"):
        layers = adapter.decoder_layers(model)
        sites = adapter.sites(model)
    prefix = module_prefix(model, layers)
    names = [(s.matrix_type, f"{prefix}.{i}.{s.path}") for i in range(len(layers)) for s in sites]
    return [p for p in patterns if not any(_matches(p, t, name) for t, name in names)]
