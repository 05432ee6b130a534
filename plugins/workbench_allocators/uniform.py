"""Uniform allocation: every group keeps the same fraction of its parameters (SVD-LLM, Basis Sharing)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from workbench.api import Allocator, GroupSpectrum, uniform_ranks


class UniformAllocator(Allocator):
    name = "uniform"
    description = "k_g = ⌊(1−ρ)·n·in·out/ω_g⌋ per group, remainder spread to meet the budget"

    def allocate(self, groups: Sequence[GroupSpectrum], budget: int, options: Mapping[str, Any]) -> dict[str, int]:
        return uniform_ranks(groups, budget)
