"""Uniform allocation: every group keeps the same fraction of its parameters (SVD-LLM, Basis Sharing)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from workbench.allocation import fill_to_budget, total_cost
from workbench.plugin_api import Allocator, GroupSpectrum


class UniformAllocator(Allocator):
    name = "uniform"
    description = "k_g = ⌊(1−ρ)·n·in·out/ω_g⌋ per group, remainder spread to meet the budget"

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> dict[str, int]:
        dense = sum(g.dense_params for g in groups)
        keep = budget / dense if dense else 0.0
        ranks = {g.key: max(1, min(g.max_rank, math.floor(keep * g.dense_params / g.omega))) for g in groups}
        # Flooring leaves up to one ω per group unspent; hand it back so the ratio is met closely.
        return fill_to_budget(groups, ranks, budget) if total_cost(groups, ranks) < budget else ranks
