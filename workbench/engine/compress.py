"""The whitening SVD engine: calibrate layer by layer, factor each group, allocate, swap modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from workbench.engine.allocation import check_allocation
from workbench.engine.calibration import GramAccumulator, capture_layer_inputs, run_layer
from workbench.errors import RunFailed, blame
from workbench.events import CancelToken, EventBus
from workbench.engine.factorize import GroupFactors, measured_loss, predicted_loss, whitened_svd
from workbench.engine.grouping import GroupPlan, module_prefix
from workbench.engine.lowrank import LowRankLinear
from workbench.engine.numerics import check_factors, check_gram, check_layer_weights, loss_check_failed
from workbench.api import Adapter, Allocator, GroupSpectrum

# The built-in check of method.md, run on every group at half its kept rank: the measured whitened
# loss must equal Σ_{i>k} σ_i². Relative to the group's total energy; float64 rounding is ~1e-13.
LOSS_CHECK_TOLERANCE = 1e-6


@dataclass
class Calibrated:
    """What calibration leaves behind: per-group factors and how each input was whitened."""

    factors: dict[str, GroupFactors]
    spectra: list[GroupSpectrum]
    whitening: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0


@dataclass
class CalibrationState:
    """Where calibration stands after a layer: all it needs to go on exactly as if never stopped.

    `hidden` is the next layer's input per batch (None once every layer is done); the batches'
    keyword arguments (rotary embeddings, masks) are not kept: they are the same for every layer,
    so a resumed run captures them again, which costs only the embedding.
    """

    next_layer: int
    hidden: list[torch.Tensor] | None
    grams: dict[tuple[str, int], torch.Tensor]  # per-layer Grams a pending group still needs
    factors: dict[str, GroupFactors]  # finished groups
    whitening: list[dict[str, Any]]
    tokens: int


def _weights(layers: nn.ModuleList, plan: GroupPlan) -> list[torch.Tensor]:
    return [layers[i].get_submodule(plan.site.path).weight for i in plan.layers]


def _factor_group(layers, plan: GroupPlan, grams: dict, method: str, device, full: bool) -> GroupFactors:
    gram = sum(grams[(plan.site.input_group, i)] for i in plan.layers)
    spectrum_stub = GroupSpectrum(plan.key, plan.matrix_type, plan.layers, plan.in_features, plan.out_features,
                                  torch.empty(0))
    weights = _weights(layers, plan)
    keep = min(plan.in_features, len(plan.layers) * plan.out_features) if full else spectrum_stub.max_rank
    factors = whitened_svd(weights, gram.to(device), keep=keep, method=method)
    k = max(1, factors.u.shape[1] // 2)
    energy = float((factors.singular_values ** 2).sum()) or 1.0
    error = abs(measured_loss(weights, factors, k) - predicted_loss(factors, k)) / energy
    if loss_check_failed(error, LOSS_CHECK_TOLERANCE) and factors.whitening.method == "cholesky":
        # An ill-conditioned Cholesky factor can pass its own test yet whiten badly: use the eigen route.
        factors = whitened_svd(weights, gram.to(device), keep=keep, method="eigen")
        factors.whitening.fallback_reason = f"loss check failed on Cholesky (relative error {error:.1e})"
        error = abs(measured_loss(weights, factors, k) - predicted_loss(factors, k)) / energy
    if loss_check_failed(error, LOSS_CHECK_TOLERANCE):
        raise RunFailed(f"{plan.key}: whitened loss check failed (relative error {error:.1e}); the Gram matrix "
                        f"is too ill-conditioned. Try more calibration samples or compression.whitening = \"eigen\".")
    return factors


def calibrate(model: nn.Module, adapter: Adapter, plans: Sequence[GroupPlan], windows: torch.Tensor,
              device: torch.device, events: EventBus, cancel: CancelToken, whitening: str = "cholesky",
              batch_size: int = 8, full_factors: bool = False, checkpoint: Any = None) -> Calibrated:
    """Accumulate Grams layer by layer and factor every group as soon as its last layer is done.

    Factors are kept up to break-even rank (beyond it a group stays dense); `full_factors` keeps
    every component, for the exactness check of the factor path. `checkpoint` (a
    `workbench.storage.checkpoint.WorkDir`) hands back the state of an interrupted run to continue from
    (`load_calibration`) and is given the state after each layer (`save_calibration`).
    """
    layers = adapter.decoder_layers(model)
    needed: dict[int, set[str]] = {}
    last_layer = max(i for p in plans for i in p.layers)
    for plan in plans:
        for i in plan.layers:
            needed.setdefault(i, set()).add(plan.site.input_group)
    pending = {plan.key: plan for plan in plans}
    grams: dict[tuple[str, int], torch.Tensor] = {}
    factors: dict[str, GroupFactors] = {}
    report: list[dict[str, Any]] = []
    tokens = 0
    start = 0
    state = checkpoint.load_calibration(device) if checkpoint is not None else None
    if state is not None:
        start, grams, factors, report, tokens = (state.next_layer, state.grams, state.factors, state.whitening,
                                                 state.tokens)
        pending = {k: p for k, p in pending.items() if k not in factors}
        events.log("calibrate", f"resumed from the checkpoint: {start} of {last_layer + 1} layers done")
    batches = []
    if start <= last_layer:
        batches = capture_layer_inputs(model, layers[0], windows, batch_size, device, cancel.check)
        if state is not None:
            _restore_inputs(batches, state.hidden)
    for i in range(start, last_layer + 1):
        cancel.check()
        layer = layers[i]
        check_layer_weights(layer, i, {p.site for p in plans if i in p.layers})
        acc = GramAccumulator()
        for group_name in sorted(needed.get(i, ())):
            site = next(p.site for p in plans if p.site.input_group == group_name)
            acc.watch(group_name, layer.get_submodule(site.path))
        try:
            run_layer(layer, batches, cancel.check)
        finally:
            acc.close()
        for group_name, gram in acc.grams.items():  # symmetric, complete
            check_gram(gram, i, group_name, sorted({p.site.path for p in plans if p.site.input_group == group_name}))
            grams[(group_name, i)] = gram
            tokens = acc.tokens[group_name]
        for plan in [p for p in pending.values() if p.layers[-1] == i]:
            f = _factor_group(layers, plan, grams, whitening, device, full_factors)
            # float64 was needed for the SVD and its check; float32 factors are exact enough to
            # build float32/bf16 modules and halve the memory held until allocation.
            factors[plan.key] = f.compact(torch.float64 if full_factors else torch.float32)
            report.append({"group": plan.key, "method": f.whitening.method, "rank_of_gram": f.whitening.rank,
                           "fallback": f.whitening.fallback_reason})
            if f.whitening.fell_back:
                events.warn("calibrate", f"{plan.key}: {f.whitening.fallback_reason}; used the eigen route")
            del pending[plan.key]
        # Drop per-layer Grams that no pending group still needs.
        live = {(p.site.input_group, j) for p in pending.values() for j in p.layers}
        for k in [k for k in grams if k not in live]:
            del grams[k]
        if checkpoint is not None:
            hidden = [b.hidden for b in batches] if i < last_layer else None
            checkpoint.save_calibration(CalibrationState(i + 1, hidden, grams, factors, report, tokens),
                                        final=i == last_layer, layers=last_layer + 1)
        events.progress("calibrate", i + 1, last_layer + 1, data={"unit": "layer"})
    del batches
    spectra = [GroupSpectrum(p.key, p.matrix_type, p.layers, p.in_features, p.out_features,
                             factors[p.key].singular_values.cpu()) for p in plans]
    events.log("calibrate", f"{len(factors)} groups factored, {tokens} tokens per Gram")
    return Calibrated(factors, spectra, report, tokens)


def _restore_inputs(batches: list, hidden: list[torch.Tensor] | None) -> None:
    """Put a checkpoint's hidden states into freshly captured batches (same windows, same batching)."""
    if hidden is None or len(hidden) != len(batches) or any(
            h.shape != b.hidden.shape or h.dtype != b.hidden.dtype for h, b in zip(hidden, batches)):
        raise RunFailed("the checkpoint's calibration inputs do not match this run's calibration batches; "
                        "start over with --force (without --resume)")
    for batch, h in zip(batches, hidden):
        batch.hidden = h.to(batch.hidden.device)


def allocate(allocator: Allocator, who: str, spectra: Sequence[GroupSpectrum], budget: int,
             options: dict[str, Any]) -> dict[str, int]:
    try:
        ranks = allocator.allocate(list(spectra), budget, dict(options))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's bug (even sys.exit) is reported by name
        raise RunFailed(f"{who} raised {type(exc).__name__}: {exc}") from exc
    return check_allocation(spectra, ranks, budget, who)


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
        basis = nn.Parameter(p.to(device), requires_grad=False)
        for i, q in zip(plan.layers, qs):
            old = layers[i].get_submodule(plan.site.path)
            new = LowRankLinear(plan.in_features, plan.out_features, rank, bias=old.bias is not None,
                                basis=basis, dtype=dtype, device=device)
            new.coef = nn.Parameter(q.to(device), requires_grad=False)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            with blame(f"adapter '{adapter.name}'", f"replacing {plan.site.path} in layer {i}"):
                adapter.replace_module(layers[i], plan.site.path, new)
        del factors[plan.key]  # free the float64 factors as soon as they are used
    return table
