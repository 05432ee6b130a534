"""Budget arithmetic shared by the engine and allocators, and the check of an allocator's answer."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from workbench.errors import PluginError
from workbench.plugin_api import GroupSpectrum


def rank_cost(group: GroupSpectrum, rank: int) -> int:
    """Parameters a group keeps at `rank`: a factorization, or the dense layers from break-even on."""
    return group.dense_params if rank >= group.max_rank else rank * group.omega


def total_cost(groups: Sequence[GroupSpectrum], ranks: Mapping[str, int]) -> int:
    return sum(rank_cost(g, ranks[g.key]) for g in groups)


def budget_for(groups: Sequence[GroupSpectrum], ratio: float) -> int:
    """T = (1 − ρ) · Σ_g n_g·in·out: the parameters the targeted layers may keep."""
    return math.floor((1.0 - ratio) * sum(g.dense_params for g in groups))


def fill_to_budget(groups: Sequence[GroupSpectrum], ranks: Mapping[str, int], budget: int) -> dict[str, int]:
    """Raise ranks one step at a time, the group furthest below its share first, while it fits.

    "Share" is the fraction of its dense parameters a group keeps; raising the lowest first keeps
    the result as close as possible to the allocator's proportions.
    """
    ranks = dict(ranks)
    spent = total_cost(groups, ranks)
    while True:
        best, best_share = None, math.inf
        for g in groups:
            k = ranks[g.key]
            if k >= g.max_rank:
                continue
            step = rank_cost(g, k + 1) - rank_cost(g, k)
            if spent + step > budget:
                continue
            share = rank_cost(g, k) / g.dense_params
            if share < best_share:
                best, best_share = g, share
        if best is None:
            return ranks
        spent += rank_cost(best, ranks[best.key] + 1) - rank_cost(best, ranks[best.key])
        ranks[best.key] += 1


def check_allocation(groups: Sequence[GroupSpectrum], ranks: object, budget: int, who: str) -> dict[str, int]:
    """Validate an allocator's answer; raise PluginError naming the allocator on any violation."""
    if not isinstance(ranks, Mapping):
        raise PluginError(f"{who} returned {type(ranks).__name__}, expected a mapping of group key to rank")
    problems = []
    keys = {g.key for g in groups}
    missing = sorted(keys - set(ranks))
    extra = sorted(set(ranks) - keys)
    if missing:
        problems.append(f"no rank for {len(missing)} group(s), e.g. {missing[:3]}")
    if extra:
        problems.append(f"ranks for unknown group(s) {extra[:3]}")
    clean: dict[str, int] = {}
    for g in groups:
        if g.key not in ranks:
            continue
        k = ranks[g.key]
        if isinstance(k, bool) or not isinstance(k, int):
            if hasattr(k, "item") and float(k.item()).is_integer():  # numpy / torch integers
                k = int(k.item())
            else:
                problems.append(f"rank for {g.key} is {k!r}, not an integer")
                continue
        if not 1 <= k <= g.max_rank:
            problems.append(f"rank {k} for {g.key} outside [1, {g.max_rank}]")
            continue
        clean[g.key] = k
    if not problems:
        spent = total_cost(groups, clean)
        slack = max(g.omega for g in groups)
        saturated = all(clean[g.key] >= g.max_rank for g in groups)
        if spent > budget + slack:
            problems.append(f"keeps {spent:,} parameters, over the budget of {budget:,} by more than one rank")
        elif spent < budget - slack and not saturated:
            problems.append(f"keeps {spent:,} parameters, under the budget of {budget:,} by more than one rank")
    if problems:
        raise PluginError(f"{who} gave an invalid allocation: " + "; ".join(problems))
    return clean
