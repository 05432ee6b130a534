"""A hand rule kept as a baseline: the first layer(s) stay dense, the other layers pay for it uniformly.

On the embedded model this crude rule beats uniform at every ratio (BENCHMARKS.md, "Allocators"),
while local spectral proxies lose to uniform. It is a yardstick for principled allocators.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from workbench.api import Allocation, Allocator, GroupSpectrum, Option, rank_cost, uniform_ranks


class ProtectFirstAllocator(Allocator):
    name = "protect-first"
    description = "groups touching the first layer(s) at break-even rank (dense), uniform elsewhere"
    options = (Option("layers", int, 1, min=0, max=1024, help="how many leading decoder layers to keep dense"),)

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> Allocation:
        first = int(options.get("layers", 1))
        kept = [g for g in groups if min(g.layers) < first]
        rest = [g for g in groups if min(g.layers) >= first]
        ranks = {g.key: g.max_rank for g in kept}
        left = budget - sum(rank_cost(g, g.max_rank) for g in kept)
        # rank 1 everywhere else must still fit (a group whose break-even rank is 1 costs its dense size there)
        if left < sum(rank_cost(g, 1) for g in rest):  # the budget cannot pay for dense first layers
            return Allocation(uniform_ranks(groups, budget), {"dense_groups": [], "note": "budget too small"})
        if rest:
            ranks.update(uniform_ranks(rest, max(left, 0)))
        return Allocation(ranks, {"dense_groups": [g.key for g in kept]})
