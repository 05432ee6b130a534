"""ARA allocation: round the rank masks the "ara" signal trained into integer ranks that meet the budget.

The signal (plugins/workbench_signals/ara.py, options in `[signals.ara]`) leaves per group a mask
m_1 ≥ m_2 ≥ … ≥ m_r over its r = max_rank positions, m_i the trained probability that component i
is kept and m_r that the group is dense. Rounding is one threshold t over all groups: a group keeps
every component with m_i ≥ t (a prefix, since m is non-increasing), and is dense when m_r ≥ t. The
steps are taken in order of decreasing m across groups, each while it fits the budget (a group whose
next step does not fit stops there), then the remainder is handed out by the shared `fill_to_budget`,
so the answer keeps at most the budget and misses it by less than one step of a group that could
still grow. With near-binary masks this is the masks' own rounding at t ≈ ½.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from workbench.api import Allocation, Allocator, GroupSpectrum, fill_to_budget, rank_cost, total_cost, trim_to_budget


def round_masks(groups: Sequence[GroupSpectrum], masks: Mapping[str, Any], budget: int) -> tuple[dict[str, int], float]:
    """(ranks, the last mask value taken): greedy by mask value under the budget, then topped up."""
    ranks = {g.key: 1 for g in groups}
    steps = []
    for g in groups:
        m = [float(x) for x in masks[g.key]]
        steps += [(-m[k - 1], g.key, k) for k in range(2, g.max_rank + 1)]
    by_key = {g.key: g for g in groups}
    spent = total_cost(groups, ranks)
    blocked: set[str] = set()
    threshold = 1.0
    for value, key, k in sorted(steps):
        if key in blocked or ranks[key] != k - 1:
            continue
        g = by_key[key]
        step = rank_cost(g, k) - rank_cost(g, k - 1)
        if spent + step > budget:
            blocked.add(key)
            continue
        ranks[key], spent, threshold = k, spent + step, -value
    return fill_to_budget(groups, trim_to_budget(groups, ranks, budget), budget), threshold


def soft_ratio(groups: Sequence[GroupSpectrum], masks: Mapping[str, Any]) -> float:
    """Fraction of the targeted parameters the trained (soft) masks remove, in expectation."""
    kept = 0.0
    for g in groups:
        m = [float(x) for x in masks[g.key]] + [0.0]
        kept += math.fsum((m[j - 1] - m[j]) * rank_cost(g, j) for j in range(1, g.max_rank + 1))
    dense = sum(g.dense_params for g in groups)
    return 1.0 - kept / dense if dense else 0.0


class AraAllocator(Allocator):
    name = "ara"
    description = ("rank masks trained with the model's loss, a budget term and a guidance term toward dense "
                   "(ARA; the 'ara' signal, options in [signals.ara]), rounded to the budget")
    needs = ("ara",)

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> Allocation:
        missing = [g.key for g in groups if "ara" not in g.sensitivity]
        if missing:
            raise ValueError(f"no 'ara' signal for {len(missing)} group(s); the engine computes it when an "
                             "allocator lists it in `needs`")
        masks = {g.key: g.sensitivity["ara"] for g in groups}
        wrong = [g.key for g in groups if len(masks[g.key]) != g.max_rank]
        if wrong:
            raise ValueError(f"the 'ara' mask of {wrong[0]} has {len(masks[wrong[0]])} values, expected its "
                             f"max_rank {by_key_rank(groups, wrong[0])}; recompute the signal")
        ranks, threshold = round_masks(groups, masks, budget)
        dense = [g.key for g in groups if ranks[g.key] >= g.max_rank]
        return Allocation(ranks, {"threshold": round(threshold, 6), "dense_groups": dense,
                                  "trained_ratio": round(soft_ratio(groups, masks), 6)})


def by_key_rank(groups: Sequence[GroupSpectrum], key: str) -> int:
    return next(g.max_rank for g in groups if g.key == key)
