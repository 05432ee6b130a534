"""Loss-aware allocation: keep the components whose removal would raise the model's loss most per parameter.

Signal ("fisher", the built-in plugin in plugins/workbench_signals; its window count is
`[signals.fisher] windows`): F_i ≈ the increase of the dense model's calibration loss
when component i of a group is dropped, a second-order estimate from per-window gradients; the
default (`signal = "component"`) uses each F_i as is. With `signal = "group"` the per-component values are pooled into one factor per group, h_g = Σ F_i / Σ σ_i²
(loss per unit of whitened error), and component i costs h_g·σ_i²: the group's own spectrum orders its
components (Eckart–Young), the model's loss decides how much each group's error matters.

Allocation: minimise Σ_g (estimated loss of the components g drops) under the parameter budget, over
all groups of all types at once. Components are kept in SVD order, so per group the kept loss is a
function of k; its upper concave envelope against cost (k·ω, the dense parameters at max_rank, where
nothing is lost) is taken greedily by slope across groups. Costs nothing beyond the signal.

Measured on the embedded model (BENCHMARKS.md, "Allocators"): "component" beats uniform, drank and
protect-first at every ratio measured; "group" loses to protect-first at 40%.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


from workbench.api import Allocation, Allocator, GroupSpectrum, Option, fill_to_budget, rank_cost, total_cost


def component_scores(group: GroupSpectrum, signal: str) -> list[float]:
    """Estimated loss of dropping each component 0..max_rank−1, plus (last) what the tail past it costs."""
    fisher = group.sensitivity["fisher"].double()
    s2 = group.singular_values.double() ** 2
    r = min(group.max_rank, fisher.numel())
    kept_energy = float(s2[:r].sum())
    scale = float(fisher[:r].sum()) / kept_energy if kept_energy > 0 else 0.0
    tail = scale * float(s2[r:].sum())  # components the engine did not keep vectors for
    if signal == "group":
        return [scale * float(x) for x in s2[:r]] + [tail]
    return [float(x) for x in fisher[:r]] + [tail]


def _upper_hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Upper concave envelope of (cost, gain, k) points sorted by cost."""
    hull: list[tuple[float, float, int]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the chord from hull[-2] to p
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def water_fill(groups: Sequence[GroupSpectrum], scores: Mapping[str, list[float]], budget: int) -> dict[str, int]:
    """Greedy over every group's concave envelope of (parameters, loss avoided), best slope first."""
    ranks = {g.key: 1 for g in groups}
    segments = []
    for g in groups:
        sc = scores[g.key]
        gain, points = 0.0, []
        for k in range(1, g.max_rank + 1):
            gain += sc[k - 1]
            if k == g.max_rank:
                gain += sc[-1]  # dense: the tail past max_rank is kept too
            points.append((float(rank_cost(g, k)), gain, k))
        hull = _upper_hull(points)
        for (x1, y1, k1), (x2, y2, k2) in zip(hull, hull[1:]):
            segments.append(((y2 - y1) / (x2 - x1), g.key, k1, k2))
    by_key = {g.key: g for g in groups}
    spent = total_cost(groups, ranks)
    blocked: set[str] = set()
    for _, key, k1, k2 in sorted(segments, key=lambda s: (-s[0], s[1], s[2])):
        if key in blocked or ranks[key] != k1:
            continue
        g = by_key[key]
        step = rank_cost(g, k2) - rank_cost(g, k1)
        if spent + step <= budget:
            ranks[key], spent = k2, spent + step
            continue
        # take what fits of this segment; the group's later segments have lower slopes anyway
        while ranks[key] < k2 and spent + rank_cost(g, ranks[key] + 1) - rank_cost(g, ranks[key]) <= budget:
            spent += rank_cost(g, ranks[key] + 1) - rank_cost(g, ranks[key])
            ranks[key] += 1
        blocked.add(key)
    return ranks


class LossAwareAllocator(Allocator):
    name = "loss-aware"
    description = "global water-filling on the model loss each component's removal costs (Fisher, one backward per window)"
    needs = ("fisher",)
    options = (
        Option("signal", str, "component", choices=("component", "group"),
               help="'group': one loss-per-whitened-error factor per group times σ_i²; 'component': each "
                    "component's own Fisher score"),
    )

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> Allocation:
        missing = [g.key for g in groups if "fisher" not in g.sensitivity]
        if missing:
            raise ValueError(f"no 'fisher' signal for {len(missing)} group(s); the engine computes it when "
                             "an allocator lists it in `needs`")
        signal = options.get("signal", "component")
        scores = {g.key: component_scores(g, signal) for g in groups}
        ranks = water_fill(groups, scores, budget)
        ranks = fill_to_budget(groups, ranks, budget)
        dense = [g.key for g in groups if ranks[g.key] >= g.max_rank]
        return Allocation(ranks, {"signal": signal, "dense_groups": dense,
                                  "estimated_loss_increase": math.fsum(
                                      sum(scores[g.key][ranks[g.key]:-1]) + scores[g.key][-1]
                                      for g in groups if ranks[g.key] < g.max_rank)})
