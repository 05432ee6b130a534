"""Which matrices are compressed, and how consecutive layers are grouped to share a basis."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from workbench.errors import UsageError
from workbench.plugin_api import Adapter, Site, nearest


@dataclass(frozen=True)
class GroupPlan:
    key: str  # e.g. "q_proj@0-1"
    site: Site
    layers: tuple[int, ...]
    in_features: int
    out_features: int

    @property
    def matrix_type(self) -> str:
        return self.site.matrix_type


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


def plan_groups(model: nn.Module, adapter: Adapter, targets: Sequence[str] | None, ignore: Sequence[str],
                group_size_for: Callable[[str], int | None]) -> list[GroupPlan]:
    """Groups of up to n consecutive targeted layers per matrix type (the last group may be shorter).

    `group_size_for(type)` returns the profile's size, or None for the adapter's default.
    """
    layers = adapter.decoder_layers(model)
    prefix = module_prefix(model, layers)
    sites = adapter.sites(model)
    types = [s.matrix_type for s in sites]
    targets = list(targets) if targets is not None else adapter.default_targets(model)
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
        size = group_size_for(site.matrix_type) or adapter.default_group_size(model, site.matrix_type)
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
    return plans
