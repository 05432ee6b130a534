"""D-Rank: effective rank + Lagrange allocation per matrix type (arXiv 2509.25622), and its β variant.

Per matrix type t with budget T_t = keep·Σ_{g∈t} n_g·in·out, minimise Σ_g R_eff(g)/k_g subject to
Σ_g k_g ω_g = T_t and 1 ≤ k_g ≤ max_rank. Stationarity gives k_g ∝ √(R_eff(g)/ω_g):
k_g = T_t·√(R_g/ω_g) / Σ_j √(R_j·ω_j) when no bound binds, else clamp(√(R_g/(λω_g)), 1, max_rank)
with λ set so the budget holds (found by bisection). Integers come from `round_to_budget`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Mapping, Sequence

from workbench.api import (Allocation, Allocator, GroupSpectrum, Option, fill_to_budget, fit_to_budget, rank_cost,
                           round_to_budget, total_cost, uniform_ranks)

# The reference code keeps gate_proj uniform whatever the comparison says.
ALWAYS_UNIFORM_WITH_FALLBACK = ("gate_proj",)
FALLBACK = Option("fallback", str, "none", choices=("none", "loss"),
                  help="'loss': per matrix type, keep uniform ranks when the dynamic ones lose more whitened "
                       "energy (the reference code's behaviour, gate_proj always uniform)")


def lagrange_closed_form(reff: Sequence[float], omega: Sequence[float], budget: float) -> list[float]:
    """k_g = T·√(R_g/ω_g) / Σ_j √(R_j·ω_j): the unbounded minimiser of Σ R_g/k_g with Σ k_g ω_g = T."""
    denom = math.fsum(math.sqrt(r * w) for r, w in zip(reff, omega))
    return [budget * math.sqrt(r / w) / denom for r, w in zip(reff, omega)]


def lagrange_bounded(reff: Sequence[float], omega: Sequence[float], budget: float,
                     low: Sequence[float], high: Sequence[float]) -> list[float]:
    """The bounded minimiser: k_g = clamp(√(R_g/(λ ω_g)), low_g, high_g) with Σ k_g ω_g = T (KKT)."""
    free = lagrange_closed_form(reff, omega, budget)
    if all(lo <= k <= hi for k, lo, hi in zip(free, low, high)):
        return free
    if budget <= math.fsum(lo * w for lo, w in zip(low, omega)):
        return list(low)
    if budget >= math.fsum(hi * w for hi, w in zip(high, omega)):
        return list(high)

    def ranks(log_lam: float) -> list[float]:
        lam = math.exp(log_lam)
        return [min(hi, max(lo, math.sqrt(r / (lam * w)))) for r, w, lo, hi in zip(reff, omega, low, high)]

    def spent(log_lam: float) -> float:
        return math.fsum(k * w for k, w in zip(ranks(log_lam), omega))

    lo_l, hi_l = -200.0, 200.0  # spent() falls as λ grows; the bracket covers any sane spectrum
    for _ in range(200):
        mid = 0.5 * (lo_l + hi_l)
        if spent(mid) > budget:
            lo_l = mid
        else:
            hi_l = mid
    return ranks(0.5 * (lo_l + hi_l))


def type_budgets(groups: Sequence[GroupSpectrum], budget: int) -> dict[str, int]:
    """Each matrix type keeps the same fraction of its dense parameters as the whole budget does."""
    dense = sum(g.dense_params for g in groups)
    keep = budget / dense if dense else 0.0
    per_type: dict[str, int] = defaultdict(int)
    for g in groups:
        per_type[g.matrix_type] += g.dense_params
    return {t: math.floor(keep * d) for t, d in per_type.items()}


def by_type(groups: Sequence[GroupSpectrum]) -> dict[str, list[GroupSpectrum]]:
    out: dict[str, list[GroupSpectrum]] = defaultdict(list)
    for g in groups:
        out[g.matrix_type].append(g)
    return dict(out)


def drank_type(groups: Sequence[GroupSpectrum], budget: int) -> dict[str, int]:
    """Integer D-Rank ranks for the groups of one matrix type within `budget` parameters."""
    cont = lagrange_bounded([g.effective_rank for g in groups], [g.omega for g in groups], budget,
                            [1.0] * len(groups), [float(g.max_rank) for g in groups])
    return round_to_budget(groups, {g.key: k for g, k in zip(groups, cont)}, budget)


def whitened_loss(groups: Sequence[GroupSpectrum], ranks: Mapping[str, int]) -> float:
    """Σ_g Σ_{i>k_g} σ_i², zero for a group kept dense."""
    return math.fsum(0.0 if ranks[g.key] >= g.max_rank else g.loss_at(ranks[g.key]) for g in groups)


def drank_ranks(groups: Sequence[GroupSpectrum], budget: int, fallback: str) -> tuple[dict[str, int], dict[str, Any]]:
    """Per-type D-Rank ranks (with the optional fallback to uniform) and notes on what fell back."""
    budgets = type_budgets(groups, budget)
    ranks: dict[str, int] = {}
    fell_back: dict[str, str] = {}
    for mtype, members in by_type(groups).items():
        dynamic = drank_type(members, budgets[mtype])
        if fallback == "loss":
            uniform = uniform_ranks(members, budgets[mtype])
            if mtype in ALWAYS_UNIFORM_WITH_FALLBACK:
                dynamic, fell_back[mtype] = uniform, "always uniform (reference code)"
            else:
                lost_dynamic, lost_uniform = whitened_loss(members, dynamic), whitened_loss(members, uniform)
                if lost_dynamic > lost_uniform:
                    dynamic = uniform
                    fell_back[mtype] = f"whitened loss {lost_dynamic:.4g} > uniform's {lost_uniform:.4g}"
        ranks.update(dynamic)
    return ranks, {"type_budgets": budgets, "fell_back_to_uniform": fell_back}


class DRankAllocator(Allocator):
    name = "drank"
    description = "D-Rank: effective rank + Lagrange allocation within each matrix type's budget"
    options = (FALLBACK,)

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> Allocation:
        ranks, notes = drank_ranks(groups, budget, options.get("fallback", "none"))
        # Each type misses its own budget by under one ω; hand the sum of those remainders back.
        return Allocation(fit_to_budget(groups, ranks, budget), notes)


def rebalance_qk_to_v(groups: Sequence[GroupSpectrum], ranks: Mapping[str, int], beta: float,
                      source: tuple[str, ...] = ("q_proj", "k_proj"), target: str = "v_proj"
                      ) -> tuple[dict[str, int], dict[str, Any]]:
    """Move β of Q's and K's parameters to V, counted in parameters so it stays budget-neutral for GQA.

    Q/K ranks shrink to round((1−β)·k); the freed parameters buy V ranks one at a time, spread
    evenly over the V groups and capped at their max_rank; what V cannot take goes back to Q/K.
    """
    ranks = dict(ranks)
    donors = [g for g in groups if g.matrix_type in source]
    takers = [g for g in groups if g.matrix_type == target]
    if not donors or not takers or beta == 0:
        return ranks, {"beta": beta, "moved_params": 0, "returned_params": 0}
    before = total_cost(donors, ranks)
    for g in donors:
        ranks[g.key] = max(1, round((1 - beta) * ranks[g.key]))
    freed = before - total_cost(donors, ranks)
    left = freed
    added = {g.key: 0 for g in takers}
    while True:  # round-robin, the V group with the fewest added ranks first
        open_ = [g for g in takers if ranks[g.key] < g.max_rank
                 and rank_cost(g, ranks[g.key] + 1) - rank_cost(g, ranks[g.key]) <= left]
        if not open_:
            break
        rounds = _whole_rounds(open_, ranks, added, left)
        if rounds:  # the same ranks as `rounds` × len(open_) single steps, without the Python loop
            for g in open_:
                ranks[g.key] += rounds
                added[g.key] += rounds
            left -= rounds * sum(g.omega for g in open_)
            continue
        g = min(open_, key=lambda g: (added[g.key], g.key))
        left -= rank_cost(g, ranks[g.key] + 1) - rank_cost(g, ranks[g.key])
        ranks[g.key] += 1
        added[g.key] += 1
    # What V could not use goes back to Q/K, lowest share first.
    back = fill_to_budget(donors, {g.key: ranks[g.key] for g in donors}, total_cost(donors, ranks) + left)
    ranks.update(back)
    returned = total_cost(donors, ranks) - (before - freed)
    return ranks, {"beta": beta, "moved_params": freed - left, "returned_params": returned}


def _whole_rounds(open_: Sequence[GroupSpectrum], ranks: Mapping[str, int], added: Mapping[str, int],
                  left: int) -> int:
    """Full rounds of the round-robin that can be taken at once: while every open group has had as
    many ranks added, each round gives each one rank at its ω (below max_rank − 1, a rank costs ω;
    the step to max_rank costs the rest of the dense matrix), so t rounds cost t·Σω."""
    if len({added[g.key] for g in open_}) != 1:
        return 0
    room = min(g.max_rank - 1 - ranks[g.key] for g in open_)
    return max(0, min(room, left // sum(g.omega for g in open_)))


class DRankRebalancedAllocator(Allocator):
    name = "drank-rebalanced"
    description = "D-Rank, then β of Q/K's parameters moved to V (budget-neutral, V capped at its useful rank)"
    options = (Option("beta", float, 0.3, min=0.0, max=0.9,
                      help="fraction of q_proj/k_proj parameters moved to v_proj (paper: 0.3–0.4)"), FALLBACK)

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> Allocation:
        ranks, notes = drank_ranks(groups, budget, options.get("fallback", "none"))
        ranks, moved = rebalance_qk_to_v(groups, ranks, float(options.get("beta", 0.3)))
        return Allocation(fit_to_budget(groups, ranks, budget), {**notes, "rebalance": moved})
