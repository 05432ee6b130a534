"""The compensation walk: a second pass over the assembled model, dense outputs as the targets.

After `assemble`, each decoder layer is walked again with two streams of the calibration windows:
the dense stream (the dense layers, rebuilt one layer at a time from the dense weights kept before
assembly) and the compressed stream (the model as it now is, with every earlier update applied).
Within a layer the input groups are visited in the adapter's site order (attention input → o_proj
→ MLP input → down_proj); for each, the inputs of both streams are captured over the same batches
(token-aligned) and G = XᵀX, C = XᵀX̂, Ĝ = X̂ᵀX̂ accumulated in float64. Then, for every low-rank
module fed by that input group:

  sequential    (groups of one layer) P and Q re-factored at the allocated rank, whitened with Ĝ, the
                compressed stream's statistics, against the dense outputs: the best rank-k M = Q·P for
                min ‖X·Wᵀ − X̂·Mᵀ‖² (`compensation.reduced_rank_fit`, ridge λ relative to mean diag Ĝ);
  closed-form   Q = W·C·Pᵀ(P·Ĝ·Pᵀ + λI)⁻¹ (`compensation.update_coefficients`), per layer against
                the group's P (shared or not).

Each change is kept only when it lowers the site's calibration objective ‖X·Wᵀ − X̂·Pᵀ·Qᵀ‖²; the
next input group then sees the updated stream. Ranks never change.

Limitation (first step): a basis shared by n > 1 layers is not re-factored (its statistics only
exist once all its layers have been walked); those groups get the per-layer Q update only.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from workbench.engine.calibration import LayerBatch, capture_layer_inputs, run_layer
from workbench.engine.compensation import output_error, reduced_rank_fit, update_coefficients
from workbench.engine.grouping import GroupPlan
from workbench.engine.lowrank import LowRankLinear

UPDATES = ("none", "closed-form")
# λ relative to the mean diagonal of P·Ĝ·Pᵀ: caps the k×k solve's condition number near 1e6, so the
# float64 solve stays stable with few tokens, while leaving a well-determined Q unchanged to ~1e-6.
DEFAULT_RIDGE = 1e-6
# The floor the sequential re-factoring falls back to when Ĝ is singular and `ridge` is 0.
SINGULAR_RIDGE = 1e-6


class _Stop(Exception):
    """Raised by a capture hook: the rest of the layer is not needed for this input group."""


def dense_weights(model: nn.Module, adapter: Any, plans: Sequence[GroupPlan]) -> dict[tuple[int, str], torch.Tensor]:
    """A host copy of every targeted weight, taken before `assemble` replaces the modules."""
    layers = adapter.decoder_layers(model)
    return {(i, p.site.path): layers[i].get_submodule(p.site.path).weight.detach().to("cpu", copy=True)
            for p in plans for i in p.layers}


def _input_groups(plans: Sequence[GroupPlan]) -> list[str]:
    order: list[str] = []
    for plan in plans:
        if plan.site.input_group not in order:
            order.append(plan.site.input_group)
    return order


def _run_until(layer: nn.Module, module: nn.Module, batches: list[LayerBatch], seen: Callable[[int, torch.Tensor], None],
               check: Callable[[], None]) -> None:
    """Run `layer` over each batch only as far as `module`'s input, handed to `seen(batch, x)`."""
    current = [0]

    def hook(mod, args):
        x = args[0].detach()
        seen(current[0], x.reshape(-1, x.shape[-1]))
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for b, batch in enumerate(batches):
                check()
                current[0] = b
                try:
                    layer(batch.hidden, **batch.kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()


def compensate(model: nn.Module, adapter: Any, plans: Sequence[GroupPlan], table: Sequence[dict[str, Any]],
               weights: dict[tuple[int, str], torch.Tensor], windows: torch.Tensor, device: torch.device,
               check: Callable[[], None], *, sequential: bool = False, update: str = "none",
               ridge: float = DEFAULT_RIDGE, batch_size: int = 8,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Walk the assembled `model` once more (module docstring); returns the report's `compensation` section."""
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; allowed: {', '.join(UPDATES)}")
    start = time.perf_counter()
    layers = adapter.decoder_layers(model)
    kept = {row["group"] for row in table if row.get("dense")}
    live = [p for p in plans if p.key not in kept]
    groups = _input_groups(plans)
    sites: list[dict[str, Any]] = []
    notes: list[str] = []
    if sequential and any(len(p.layers) > 1 for p in live):
        notes.append("sequential re-factoring applies to groups of one layer only; shared bases (n > 1) "
                     "kept their basis and got the per-layer update only")
    last = max((i for p in live for i in p.layers), default=-1)
    if last >= 0:
        hidden = capture_layer_inputs(model, layers[0], windows, batch_size, device, check)
        dense = [LayerBatch(b.hidden.clone(), b.kwargs) for b in hidden]  # same embeddings in both streams
        for i in range(last + 1):
            check()
            layer = layers[i]
            here = [p for p in live if i in p.layers]
            modules = {p.site.path: layer.get_submodule(p.site.path) for p in here}
            # dense pass: the dense modules swapped in for this layer only; each input group's X kept per batch
            xs: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
            watch = {g: next(p.site.path for p in plans if p.site.input_group == g) for g in groups
                     if any(p.site.input_group == g for p in here)}
            for path, module in modules.items():
                adapter.replace_module(layer, path, module.as_linear(weights[(i, path)].to(device)))
            handles = [layer.get_submodule(path).register_forward_pre_hook(
                lambda mod, args, g=g: xs[g].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()))
                for g, path in watch.items()]
            try:
                run_layer(layer, dense, check)
            finally:
                for h in handles:
                    h.remove()
                for path, module in modules.items():
                    adapter.replace_module(layer, path, module)
            # compressed stream, one input group at a time, updating as it goes
            for g in [g for g in groups if g in watch]:
                t0 = time.perf_counter()
                width = xs[g][0].shape[1]
                stats = {name: torch.zeros(width, width, dtype=torch.float64, device=device)
                         for name in ("gram", "cross", "gram_hat")}

                def seen(b: int, x_hat: torch.Tensor, g=g, stats=stats) -> None:
                    x, xh = xs[g][b].double(), x_hat.double()
                    stats["gram"].addmm_(x.mT, x)
                    stats["cross"].addmm_(x.mT, xh)
                    stats["gram_hat"].addmm_(xh.mT, xh)

                _run_until(layer, layer.get_submodule(watch[g]), hidden, seen, check)
                xs[g] = []
                share = (time.perf_counter() - t0) / max(1, sum(p.site.input_group == g for p in here))
                for plan in [p for p in here if p.site.input_group == g]:
                    sites.append(_update_site(plan, i, modules[plan.site.path], weights[(i, plan.site.path)], stats,
                                              sequential, update, ridge, share))
            run_layer(layer, hidden, check)  # the compressed stream moves on through the updated layer
            if progress:
                progress(i, last)
        del hidden, dense
    return {"sequential": sequential, "update": update, "ridge": ridge, "sites": sites, "notes": notes,
            "objective_before": sum(s["objective_before"] for s in sites),
            "objective_after": sum(s["objective_after"] for s in sites),
            "time_s": round(time.perf_counter() - start, 3)}


def _update_site(plan: GroupPlan, i: int, module: LowRankLinear, weight: torch.Tensor, stats: dict[str, torch.Tensor],
                 sequential: bool, update: str, ridge: float, shared_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    g, c, gh = stats["gram"], stats["cross"], stats["gram_hat"]
    w = weight.to(device=g.device, dtype=torch.float64)
    p, q = module.basis.weight.detach().double(), module.coef.weight.detach().double()
    before = output_error(w, q, p, g, c, gh)
    entry: dict[str, Any] = {"group": plan.key, "layer": i, "rank": module.rank, "objective_before": before}
    current = before
    if sequential and len(plan.layers) == 1:
        refit = float("inf")
        # Ĝ is singular where an earlier low-rank module limits the stream (o_proj after a low-rank v_proj):
        # without a ridge, the smallest one that makes it factor (the null space carries no output).
        for lam in dict.fromkeys([ridge, max(ridge, SINGULAR_RIDGE)]):
            try:
                q_new, p_new = reduced_rank_fit(w, gh, c, module.rank, ridge=lam)
            except torch.linalg.LinAlgError as exc:
                entry["refactor_skipped"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                continue
            entry.pop("refactor_skipped", None)
            entry["refactor_ridge"] = lam
            refit = output_error(w, q_new, p_new, g, c, gh)
            break
        entry["refactored"] = refit < current
        if entry["refactored"]:
            p, q, current = p_new, q_new, refit
            with torch.no_grad():
                module.basis.weight.copy_(p)
                module.coef.weight.copy_(q)
    if update == "closed-form":
        result = update_coefficients(w, p, g, c, gh, coef=q, ridge=ridge)
        entry.update(ridge=result.ridge, updated=result.taken)
        if result.taken:
            current = result.objective_after
            with torch.no_grad():
                module.coef.weight.copy_(result.coef)
    entry["objective_after"] = current
    entry["time_s"] = round(shared_s + time.perf_counter() - t0, 4)
    return entry
