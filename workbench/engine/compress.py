"""The whitening SVD engine: calibrate (the layer walk with the default strategies), allocate, swap modules."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch
from torch import nn

from workbench.engine.allocation import check_allocation
from workbench.errors import PluginError, RunFailed, WorkbenchError, blame
from workbench.events import CancelToken, EventBus
from workbench.engine.factorize import (GroupFactors, measured_loss, measured_output_loss, output_svd, predicted_loss,
                                       whitened_svd)
from workbench.engine.grouping import GroupPlan, module_prefix
from workbench.engine.lowrank import LowRankLinear, factor_linear
from workbench.engine.numerics import check_factors, loss_check_failed
from workbench.engine.state import CalibrationCheckpoint, CalibrationState  # noqa: F401 - CalibrationState re-exported
from workbench.engine.walk import Factor, GramStatistics, LayerWalk, Strategies, shared_by, spent_by, whitening_key
from workbench.engine.whitening import Whitening
from workbench.api import Adapter, Allocator, GroupSpectrum, break_even_rank

# The built-in check (docs/architecture.md), run on every group at half its kept rank: the measured whitened
# loss must equal Σ_{i>k} σ_i². Relative to the group's total energy; float64 rounding is ~1e-13.
LOSS_CHECK_TOLERANCE = 1e-6


@dataclass
class Calibrated:
    """What calibration leaves behind: per-group factors and how each input was whitened."""

    factors: dict[str, GroupFactors]
    spectra: list[GroupSpectrum]
    whitening: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0


def _weights(layers: nn.ModuleList, plan: GroupPlan) -> list[torch.Tensor]:
    return [layers[i].get_submodule(plan.site.path).weight for i in plan.layers]


def _group_gram(grams: dict, keys: list, device, overwritable: bool) -> tuple[torch.Tensor, bool]:
    """(the group's Gram on `device`, may it be overwritten). A resumed Gram may be on the host; one
    layer's is used as it is (sum() would copy it: 0.97 GB at a 7B down_proj, held through the SVD),
    a shared group's summed into one new matrix (its own)."""
    parts = [grams[key].to(device) for key in keys]
    gram, own = parts[0], overwritable or parts[0] is not grams[keys[0]]  # or a copy on `device`
    if len(parts) > 1:
        gram, own = parts[0].clone(), True
        for part in parts[1:]:
            gram.add_(part)
    return gram, own


def _loss_mismatch(factors: GroupFactors, measured: Callable[[int], float]) -> float:
    """The built-in check at half the kept rank k: |measured(k) − Σ_{i>k} σ_i²| relative to the group's energy."""
    k = max(1, factors.u.shape[1] // 2)
    energy = float((factors.singular_values ** 2).sum()) or 1.0
    return abs(measured(k) - predicted_loss(factors, k)) / energy


def _factor_group(layers, plan: GroupPlan, grams: dict, method: str, device, full: bool,
                  spent: Collection = (), white: Whitening | None = None, overwrite: bool = False) -> GroupFactors:
    """`spent`: keys of `grams` that nothing reads after this group, so its Gram may become L in place;
    `overwrite`: the same for a group whose whitening later groups reuse; `white`: that whitening, reused."""
    keys = [(plan.statistic, i) for i in plan.layers]
    weights = _weights(layers, plan)
    full_rank = min(plan.in_features, len(plan.layers) * plan.out_features)
    keep = full_rank if full else break_even_rank(plan.in_features, plan.out_features, len(plan.layers))
    if plan.output_statistic:
        return _factor_from_output(plan, weights[0], grams[keys[0]].to(device), keep)
    gram = own = None
    if white is None:
        gram, own = _group_gram(grams, keys, device, overwrite or keys[0] in spent)
    factors = whitened_svd(weights, gram, keep=keep, method=method, overwrite=own, white=white)
    error = _loss_mismatch(factors, lambda k: measured_loss(weights, factors, k))
    if loss_check_failed(error, LOSS_CHECK_TOLERANCE) and factors.whitening.method == "cholesky":
        # An ill-conditioned Cholesky factor can pass its own test yet whiten badly: use the eigen route.
        # Factored in place, G survives as L·Lᵀ only: equal to it within the rounding the eigen route drops.
        if factors.whitening.in_place:
            lower = factors.whitening.factor
            gram = lower @ lower.mT
        elif gram is None:  # a reused whitening, the Grams intact
            gram, _ = _group_gram(grams, keys, device, False)
        factors = whitened_svd(weights, gram, keep=keep, method="eigen")
        factors.whitening.fallback_reason = f"loss check failed on Cholesky (relative error {error:.1e})"
        error = _loss_mismatch(factors, lambda k: measured_loss(weights, factors, k))
    if loss_check_failed(error, LOSS_CHECK_TOLERANCE):
        raise RunFailed(f"{plan.key}: whitened loss check failed (relative error {error:.1e}); the Gram matrix "
                        f"is too ill-conditioned. Try more calibration samples or compression.whitening = \"eigen\".")
    return factors


def _factor_from_output(plan: GroupPlan, weight: torch.Tensor, gram: torch.Tensor, keep: int) -> GroupFactors:
    """A one-layer group from its output's Gram (`grouping.output_statistics`), with the same loss check."""
    factors = output_svd(weight, gram, keep)
    error = _loss_mismatch(factors, lambda k: measured_output_loss(factors, gram, k))
    if loss_check_failed(error, LOSS_CHECK_TOLERANCE):
        raise RunFailed(f"{plan.key}: whitened loss check failed on its output's Gram (relative error {error:.1e})")
    return factors


def group_factorer(whitening: str, device: torch.device, events: EventBus, full_factors: bool = False) -> Factor:
    """The walk's factor step: whiten and decompose one complete group, checked, kept compact.

    Groups whitened by the same Grams (q/k/v of a layer, gate/up) factor them once: the first keeps
    its whitening for the others (in the Grams' memory when nothing else reads them) until the last
    of them spends the Grams."""
    reused: dict[tuple, Whitening] = {}

    def factor(layers, plan: GroupPlan, grams: dict) -> tuple[GroupFactors, dict[str, Any]]:
        spent, share = spent_by(grams, plan.key), shared_by(grams, plan.key)
        mine = whitening_key(plan)
        for gone in [w for w in reused if any((w[0], j) not in grams for j in w[1])]:
            del reused[gone]  # its layer is done (under torchrun its last reader may have run elsewhere)
        f = _factor_group(layers, plan, grams, whitening, device, full_factors, spent,
                          white=reused.get(mine), overwrite=bool(share))
        if share is not None:
            reused[mine] = f.whitening
        for key in spent:  # nothing reads it again: freed now, before the layer's next group is factored
            grams.pop(key, None)
        if spent:
            reused.pop(mine, None)
        if f.whitening.fell_back:
            events.warn("calibrate", f"{plan.key}: {f.whitening.fallback_reason}; used the eigen route")
        entry = {"group": plan.key, "method": f.whitening.method, "rank_of_gram": f.whitening.rank,
                 "fallback": f.whitening.fallback_reason}
        # float64 was needed for the SVD and its check; float32 factors are exact enough to
        # build float32/bf16 modules and halve the memory held until allocation.
        return f.compact(torch.float64 if full_factors else torch.float32), entry

    return factor


def calibrate(model: nn.Module, adapter: Adapter, plans: Sequence[GroupPlan], windows: torch.Tensor,
              device: torch.device, events: EventBus, cancel: CancelToken, whitening: str = "cholesky",
              batch_size: int = 8, full_factors: bool = False, checkpoint: CalibrationCheckpoint | None = None,
              strategies: Strategies | None = None, gram_precision: str = "float64",
              factors_home: torch.device | None = None, factor_spill: Any = None) -> Calibrated:
    """Walk the layers once (workbench/engine/walk.py), factoring every group as soon as its last layer is done.

    Factors are kept up to break-even rank (beyond it a group stays dense); `full_factors` keeps
    every component, for the exactness check of the factor path. `checkpoint` (e.g. a
    `workbench.storage.checkpoint.WorkDir`) hands back the state of an interrupted run to continue
    from and is given the state after each layer. `strategies` replaces the walk's defaults;
    without them, `gram_precision` (a resolved mode, see `resolve_gram_precision`) picks how the
    default accumulator forms its Gram products. `factors_home` (offload): where each group's factors
    go once checked, off the compute device; `factor_spill` (an offload.FactorSpill) writes them to files
    mapped back into memory instead of holding them there.
    """
    if strategies is None:
        strategies = Strategies(accumulator=GramStatistics(gram_precision))
    last = max(i for p in plans for i in p.layers)
    state = checkpoint.load_calibration(factors_home or device) if checkpoint is not None else None
    if state is not None:
        events.log("calibrate", f"resumed from the checkpoint: {state.next_layer} of {last + 1} layers done")
    after: list = []
    if checkpoint is not None:
        after.append(lambda done: checkpoint.save_calibration(done.state, final=done.final, layers=done.last + 1))
    after.append(lambda done: events.progress("calibrate", done.index + 1, done.last + 1, data={"unit": "layer"}))
    factor = group_factorer(whitening, device, events, full_factors)
    if factors_home is not None:
        from workbench.engine.offload import factors_to_host

        factor = factors_to_host(factor, factor_spill)
    if factor_spill is not None:
        after.append(lambda done: factor_spill.remap(done.state.factors))
    walk = LayerWalk(model, adapter, plans, factor, strategies, after)
    final = walk.run(windows, device, cancel.check, batch_size, state)
    factors = final.factors
    spectra = [GroupSpectrum(p.key, p.matrix_type, p.layers, p.in_features, p.out_features,
                             factors[p.key].singular_values.cpu()) for p in plans]
    events.log("calibrate", f"{len(factors)} groups factored, {final.tokens} tokens per Gram")
    return Calibrated(factors, spectra, final.whitening, final.tokens)


def allocate(allocator: Allocator, who: str, spectra: Sequence[GroupSpectrum], budget: int,
             options: dict[str, Any]) -> dict[str, int]:
    try:
        ranks = allocator.allocate(list(spectra), budget, dict(options))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's bug (even sys.exit) is reported by name
        raise RunFailed(f"{who} raised {type(exc).__name__}: {exc}") from exc
    try:  # its answer is the plugin's code too: a mapping whose reading raises is still its fault
        checked = check_allocation(spectra, ranks, budget, who)
        json.dumps(checked.notes, default=str)  # notes go into report.json
    except WorkbenchError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - named, like a raise inside allocate()
        raise PluginError(f"{who} returned an answer that cannot be read or saved in report.json: "
                          f"{type(exc).__name__}: {exc}") from exc
    return checked


def assemble(model: nn.Module, adapter: Adapter, plans: Sequence[GroupPlan], factors: dict[str, GroupFactors],
             ranks: dict[str, int], spectra: Sequence[GroupSpectrum], factor_all: bool = False) -> list[dict[str, Any]]:
    """Swap low-rank modules in where factoring pays; keep the rest dense. Returns the rank table.

    `factor_all` factors even past break-even (only useful to check that the factor path is exact).
    """
    layers = adapter.decoder_layers(model)
    prefix = module_prefix(model, layers)
    by_key = {s.key: s for s in spectra}
    table = []
    for plan in plans:
        spec, rank = by_key[plan.key], ranks[plan.key]
        dense = rank >= spec.max_rank and not factor_all
        entry = {"group": plan.key, "type": plan.matrix_type, "layers": list(plan.layers), "in": plan.in_features,
                 "out": plan.out_features, "rank": rank, "max_rank": spec.max_rank, "dense": dense,
                 "effective_rank": round(spec.effective_rank, 3),
                 "params": spec.dense_params if dense else rank * spec.omega,
                 "loss": spec.loss_at(rank), "energy": spec.loss_at(0),
                 "modules": [f"{prefix}.{i}.{plan.site.path}" for i in plan.layers]}
        table.append(entry)
        if dense:
            continue
        first = layers[plan.layers[0]].get_submodule(plan.site.path)
        dtype, device = first.weight.dtype, first.weight.device
        qs, p = factors[plan.key].factors(rank, dtype=dtype)
        check_factors(plan.key, qs, p, dtype)
        # One basis module per group, held by each of its layers (peft and saving see it as shared).
        basis = factor_linear(plan.in_features, rank, weight=nn.Parameter(p.to(device), requires_grad=False))
        for i, q in zip(plan.layers, qs):
            old = layers[i].get_submodule(plan.site.path)
            new = LowRankLinear(plan.in_features, plan.out_features, rank, bias=old.bias is not None,
                                basis=basis, dtype=dtype, device=device)
            new.coef = factor_linear(rank, plan.out_features, weight=nn.Parameter(q.to(device), requires_grad=False))
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            with blame(f"adapter '{adapter.name}'", f"replacing {plan.site.path} in layer {i}"):
                adapter.replace_module(layers[i], plan.site.path, new)
        del factors[plan.key]  # free the group's factors (float32 once compacted) as soon as they are used
    return table
