"""Budget arithmetic shared by the engine and allocators, and the check of an allocator's answer."""

from __future__ import annotations

import math
import operator
from typing import Mapping, Sequence

from workbench.errors import PluginError
from workbench.api import Allocation, GroupSpectrum


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


def as_rank(value: object) -> int | None:
    """`value` as a plain int if it is an integer: int, numpy or one-element torch integer.

    Floats are refused even when whole (3.0): an allocator returning them is rounding somewhere
    it did not decide to, and the budget check would not see it. Booleans are refused too: True is
    an int to Python but never a rank anyone meant.
    """
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(value)  # int, numpy integers, integer tensors; TypeError for floats
    except (TypeError, ValueError, RuntimeError):
        return None


def check_allocation(groups: Sequence[GroupSpectrum], ranks: object, budget: int, who: str) -> Allocation:
    """Validate an allocator's answer; raise PluginError naming the allocator on any violation.

    Returns the ranks as plain ints in an `Allocation`, with the allocator's notes if it gave any.
    """
    if not isinstance(ranks, Mapping):
        raise PluginError(f"{who} returned {type(ranks).__name__}, expected a mapping of group key to rank")
    problems = []
    keys = {g.key for g in groups}
    missing = sorted(keys - set(ranks))
    extra = sorted(set(ranks) - keys, key=repr)  # a buggy allocator's keys need not be strings
    if missing:
        problems.append(f"no rank for {len(missing)} group(s), e.g. {missing[:3]}")
    if extra:
        problems.append(f"ranks for unknown group(s) {extra[:3]}")
    clean: dict[str, int] = {}
    for g in groups:
        if g.key not in ranks:
            continue
        k = as_rank(ranks[g.key])
        if k is None:
            problems.append(f"rank for {g.key} is {ranks[g.key]!r} ({type(ranks[g.key]).__name__}), not an integer")
            continue
        if not 1 <= k <= g.max_rank:
            problems.append(f"rank {k} for {g.key} outside [1, {g.max_rank}]")
            continue
        clean[g.key] = k
    if not problems:
        spent = total_cost(groups, clean)
        slack = max(g.omega for g in groups)
        # "saturated": no group can take one more rank within the budget (all at max_rank, or the
        # last step to dense, up to 2ω−1 parameters, does not fit)
        saturated = all(clean[g.key] >= g.max_rank
                        or spent + rank_cost(g, clean[g.key] + 1) - rank_cost(g, clean[g.key]) > budget
                        for g in groups)
        if spent > budget + slack:
            problems.append(f"keeps {spent:,} parameters, over the budget of {budget:,} by more than one rank")
        elif spent < budget - slack and not saturated:
            problems.append(f"keeps {spent:,} parameters, under the budget of {budget:,} by more than one rank")
    notes = getattr(ranks, "notes", None)
    if notes is not None and not isinstance(notes, Mapping):
        problems.append(f"notes are {type(notes).__name__}, expected a mapping")
    if problems:
        raise PluginError(f"{who} gave an invalid allocation: " + "; ".join(problems))
    return Allocation(clean, notes)


def uniform_ranks(groups: Sequence[GroupSpectrum], budget: int) -> dict[str, int]:
    """Every group keeps the same fraction of its parameters, k_g = ⌊keep·n·in·out/ω_g⌋, then topped up."""
    dense = sum(g.dense_params for g in groups)
    keep = budget / dense if dense else 0.0
    ranks = {g.key: max(1, min(g.max_rank, math.floor(keep * g.dense_params / g.omega))) for g in groups}
    # Flooring leaves up to one ω per group unspent; hand it back so the ratio is met closely. (A
    # group floored onto max_rank costs its dense parameters, slightly more: trimmed first.)
    return fit_to_budget(groups, ranks, budget)


def round_to_budget(groups: Sequence[GroupSpectrum], continuous: Mapping[str, float], budget: int) -> dict[str, int]:
    """Integer ranks from a continuous solution: floor, clamp to [1, max_rank], then hand the rest
    of the budget out one rank at a time, largest fractional part first, while it fits.

    The result keeps at most `budget` parameters and misses it by less than one ω of a group that
    could still grow (the reference code's ±1 repair can do neither).
    """
    ranks = {g.key: max(1, min(g.max_rank, math.floor(continuous[g.key]))) for g in groups}
    # a group floored onto max_rank costs its dense parameters, a little more than max_rank·ω
    ranks = trim_to_budget(groups, ranks, budget)
    spent = total_cost(groups, ranks)
    order = sorted(groups, key=lambda g: (-(continuous[g.key] - math.floor(continuous[g.key])), g.key))
    grew = True
    while grew and spent < budget:
        grew = False
        for g in order:
            k = ranks[g.key]
            if k >= g.max_rank:
                continue
            step = rank_cost(g, k + 1) - rank_cost(g, k)
            if spent + step <= budget:
                ranks[g.key], spent, grew = k + 1, spent + step, True
    return ranks


def trim_to_budget(groups: Sequence[GroupSpectrum], ranks: Mapping[str, int], budget: int) -> dict[str, int]:
    """Lower ranks, the group keeping the largest share of its parameters first, until the budget holds
    (or every rank is 1)."""
    ranks = dict(ranks)
    spent = total_cost(groups, ranks)
    while spent > budget:
        shrinkable = [g for g in groups if ranks[g.key] > 1]
        if not shrinkable:
            return ranks
        g = max(shrinkable, key=lambda g: (rank_cost(g, ranks[g.key]) / g.dense_params, g.key))
        spent -= rank_cost(g, ranks[g.key]) - rank_cost(g, ranks[g.key] - 1)
        ranks[g.key] -= 1
    return ranks


def fit_to_budget(groups: Sequence[GroupSpectrum], ranks: Mapping[str, int], budget: int) -> dict[str, int]:
    """`trim_to_budget` if over, `fill_to_budget` if there is room: for allocators that solve
    sub-problems (say, one per matrix type) separately."""
    return fill_to_budget(groups, trim_to_budget(groups, ranks, budget), budget)
