"""An example third-party allocator: each layer keeps a share of its parameters that ramps linearly
with depth, scaled so the whole budget is met.

share(l) ∝ 1 + slope·(1 − 2·l/(L−1)): slope > 0 favours early layers, slope < 0 late ones.
"""

from __future__ import annotations

import math

from workbench.api import Allocation, Allocator, Option, fit_to_budget, hookimpl


class DepthRamp(Allocator):
    name = "depth-ramp"
    description = "share of parameters kept ramps linearly with depth (example plugin)"
    options = (Option("slope", float, 0.5, min=-0.95, max=0.95,
                      help="> 0 keeps more in early layers, < 0 in late ones"),)

    def allocate(self, groups, budget, options):
        last = max(max(g.layers) for g in groups) or 1
        weight = {g.key: 1 + options["slope"] * (1 - 2 * (sum(g.layers) / g.n) / last) for g in groups}
        scale = budget / sum(weight[g.key] * g.dense_params for g in groups)
        ranks = {g.key: max(1, min(g.max_rank, math.floor(scale * weight[g.key] * g.dense_params / g.omega)))
                 for g in groups}
        return Allocation(fit_to_budget(groups, ranks, budget), {"slope": options["slope"]})


@hookimpl
def register_allocators(register):
    register(DepthRamp())
