"""An example third-party signal and an allocator that needs it.

"weight-energy": dropping component i of a group changes its stacked weights by σ_i·u_i·(v_iᵀL⁻¹),
whose squared Frobenius norm is σ_i²·‖u_i‖²·‖v_iᵀL⁻¹‖². The whitened spectrum ranks components by
their effect on the layer outputs over the calibration data; this ranks them by plain weight energy.
"""

from __future__ import annotations

import heapq

from workbench.api import Allocation, Allocator, Option, Signal, fit_to_budget, hookimpl


class WeightEnergy(Signal):
    name = "weight-energy"
    description = "per kept component: its energy in the plain weights, σ²·‖u‖²·‖L⁻ᵀv‖² (example plugin)"
    options = (Option("relative", bool, False, help="divide by the group's dense weight energy ‖W_g‖²_F"),)

    def compute(self, ctx):
        layers = ctx.adapter.decoder_layers(ctx.model)
        out = {}
        for plan in ctx.plans:
            f = ctx.factors[plan.key]
            r = f.u.shape[1]
            energy = (f.singular_values[:r].double() ** 2 * (f.u.double() ** 2).sum(dim=0)
                      * (f.vt_linv.double() ** 2).sum(dim=1))
            if ctx.options["relative"]:
                dense = sum(float((layers[i].get_submodule(plan.site.path).weight.detach().double() ** 2).sum())
                            for i in plan.layers)
                energy = energy / (dense or 1.0)
            out[plan.key] = energy.cpu()
        return out


class EnergyGreedy(Allocator):
    name = "energy-greedy"
    description = "keeps the components with the most plain weight energy per parameter (example plugin)"
    needs = ("weight-energy",)

    def allocate(self, groups, budget, options):
        ranks = {g.key: 1 for g in groups}
        spent = sum(g.omega for g in groups)
        energy = {g.key: g.sensitivity["weight-energy"] for g in groups}
        # next component of each group, best energy per parameter first (ties: by key, deterministic)
        heap = [(-float(energy[g.key][1]) / g.omega, g.key) for g in groups if g.max_rank > 1]
        heapq.heapify(heap)
        by_key = {g.key: g for g in groups}
        while heap:
            _, key = heapq.heappop(heap)
            g = by_key[key]
            if spent + g.omega > budget:
                continue
            ranks[key] += 1
            spent += g.omega
            if ranks[key] < min(g.max_rank, len(energy[key])):
                heapq.heappush(heap, (-float(energy[key][ranks[key]]) / g.omega, key))
        ranks = fit_to_budget(groups, ranks, budget)
        return Allocation(ranks, {"components_kept": sum(ranks.values())})


@hookimpl
def register_signals(register):
    register(WeightEnergy())


@hookimpl
def register_allocators(register):
    register(EnergyGreedy())
