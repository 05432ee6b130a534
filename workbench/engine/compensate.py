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
  closed-form   Q = W·C·Pᵀ(P·Ĝ·Pᵀ + λI)⁻¹ (`compensation.solve_coefficients`), per layer against
                the group's P (shared or not).

Both fits are shrunk toward the current factors (the whitened SVD): a ridge λ‖M − M₀‖², so a large λ
gives the allocation's own factors back. With `holdout` > 0, a share of the calibration windows (spread
evenly, every 1/holdout-th) is kept out of the fit: λ is picked from a grid by the objective
‖X·Wᵀ − X̂·Pᵀ·Qᵀ‖² on those held-out windows, a change is kept only when it lowers that held-out
objective, and the kept change is then refit on all windows with the chosen λ. This is what stops the
update from fitting the calibration text where few tokens meet a wide input. With `holdout` = 0 the
fit uses `ridge` and a change is kept when it lowers the objective on the windows it was fit on. The
next input group then sees the updated stream. Ranks never change.

Limitation (first step): a basis shared by n > 1 layers is not re-factored (its statistics only
exist once all its layers have been walked); those groups get the per-layer Q update only.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from workbench.engine.calibration import LayerBatch, add_gram, capture_layer_inputs, run_layer, symmetrize
from workbench.engine.compensation import OutputError, reduced_rank_fit, solve_coefficients
from workbench.engine.grouping import GroupPlan
from workbench.engine.lowrank import LowRankLinear

UPDATES = ("none", "closed-form")
# λ relative to the mean diagonal of P·Ĝ·Pᵀ: caps the k×k solve's condition number near 1e6, so the
# float64 solve stays stable with few tokens, while leaving a well-determined Q unchanged to ~1e-6.
DEFAULT_RIDGE = 1e-6
# The floor the sequential re-factoring falls back to when Ĝ is singular and `ridge` is 0.
SINGULAR_RIDGE = 1e-6
# Share of the calibration windows held out to choose λ and to accept a change (0: none held out).
DEFAULT_HOLDOUT = 0.25
# The λ grid searched on the held-out windows, above `ridge` (relative, as `ridge` is). Steps of 100
# keep the search to a few fits per site; at the top end the fit is close to the current factors.
RIDGE_GRID = (1e-6, 1e-4, 1e-2, 1.0, 1e2)
STATS = ("gram", "cross", "gram_hat")


def held_out_windows(count: int, holdout: float) -> list[bool]:
    """Which of `count` windows are held out: every 1/holdout-th, spread evenly; none when that leaves
    either side empty."""
    if holdout <= 0 or count < 2:
        return [False] * count
    held = [int((j + 1) * holdout) > int(j * holdout) for j in range(count)]
    return held if 0 < sum(held) < count else [False] * count


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
               ridge: float = DEFAULT_RIDGE, holdout: float = DEFAULT_HOLDOUT, batch_size: int = 8,
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
    split = False
    if last >= 0:
        hidden = capture_layer_inputs(model, layers[0], windows, batch_size, device, check)
        dense = [LayerBatch(b.hidden.clone(), b.kwargs) for b in hidden]  # same embeddings in both streams
        held = held_out_windows(sum(b.hidden.shape[0] for b in hidden), holdout)
        if holdout > 0 and not any(held):
            notes.append(f"holdout {holdout} leaves no window on one side of {len(held)}: fit and accepted on all")
        # per batch, which of its rows (window by window) are held out; None: the whole batch is fit
        masks, first = [], 0
        for b in hidden:
            n, rows = b.hidden.shape[0], b.hidden.shape[0] * b.hidden.shape[1]
            part = held[first:first + n]
            masks.append(torch.tensor(part, device=device).repeat_interleave(rows // n) if any(part) else None)
            first += n
        split = any(held)
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
                parts = ("fit", "held") if split else ("fit",)
                stats = {part: {name: torch.zeros(width, width, dtype=torch.float64, device=device) for name in STATS}
                         for part in parts}

                def seen(b: int, x_hat: torch.Tensor, g=g, stats=stats) -> None:
                    x, xh = xs[g][b].double(), x_hat.double()
                    mask = masks[b]
                    pieces = [("fit", x, xh)] if mask is None else [("fit", x[~mask], xh[~mask]),
                                                                    ("held", x[mask], xh[mask])]
                    for part, a, ah in pieces:
                        add_gram(stats[part]["gram"], a)  # upper blocks only: symmetric
                        stats[part]["cross"].addmm_(a.mT, ah)
                        add_gram(stats[part]["gram_hat"], ah)

                _run_until(layer, layer.get_submodule(watch[g]), hidden, seen, check)
                xs[g] = []
                for part in parts:
                    symmetrize(stats[part]["gram"])
                    symmetrize(stats[part]["gram_hat"])
                share = (time.perf_counter() - t0) / max(1, sum(p.site.input_group == g for p in here))
                for plan in [p for p in here if p.site.input_group == g]:
                    sites.append(_update_site(plan, i, modules[plan.site.path], weights[(i, plan.site.path)], stats,
                                              sequential, update, ridge, share))
                del stats
            run_layer(layer, hidden, check)  # the compressed stream moves on through the updated layer
            if progress:
                progress(i, last)
        del hidden, dense
    return {"sequential": sequential, "update": update, "ridge": ridge, "holdout": holdout if split else 0.0,
            "sites": sites, "notes": notes,
            "objective_before": sum(s["objective_before"] for s in sites),
            "objective_after": sum(s["objective_after"] for s in sites),
            **({"held_out_before": sum(s["held_out_before"] for s in sites),
                "held_out_after": sum(s["held_out_after"] for s in sites)} if split else {}),
            "time_s": round(time.perf_counter() - start, 3)}


def _choose(lams: Sequence[float], fit: Callable[[float], Any], score: Callable[[Any], float],
            baseline: float) -> tuple[float, Any, float] | None:
    """The λ of `lams` whose fit scores lowest, with that fit and score; None when no fit beats `baseline`."""
    best = None
    for lam in lams:
        result = fit(lam)
        if result is None:
            continue
        value = score(result)
        if value < baseline and (best is None or value < best[2]):
            best = (lam, result, value)
    return best


def _update_site(plan: GroupPlan, i: int, module: LowRankLinear, weight: torch.Tensor,
                 stats: dict[str, dict[str, torch.Tensor]], sequential: bool, update: str, ridge: float,
                 shared_s: float) -> dict[str, Any]:
    """Re-factor and/or update one site from its statistics: `stats["fit"]` and, when windows were held
    out, `stats["held"]` (module docstring). `objective_*` are on all windows; `held_out_*` (when held
    out) on the held-out ones, `after` for the factors fit without them, the ones that were judged."""
    t0 = time.perf_counter()
    held = stats.get("held")
    fit = stats["fit"]
    total = {n: fit[n] + held[n] for n in STATS} if held else fit
    judge = held or total  # the statistics a change must improve on
    w = weight.to(device=total["gram"].device, dtype=torch.float64)
    p0, q0 = module.basis.weight.detach().double(), module.coef.weight.detach().double()

    # one OutputError per distinct statistics set (fit, judge and total are one set when nothing is held
    # out): its factor-free terms (tr W·G·Wᵀ, W·C) are shared by every fit scored
    errors: dict[int, OutputError] = {}
    for on in (fit, judge, total):
        if id(on) not in errors:
            errors[id(on)] = OutputError(w, on["gram"], on["cross"], on["gram_hat"])

    def error(q_: torch.Tensor, p_: torch.Tensor, on: dict[str, torch.Tensor]) -> float:
        return errors[id(on)](q_, p_)

    def refit(lam: float, on: dict[str, torch.Tensor]):
        # Ĝ is singular where an earlier low-rank module limits the stream (o_proj after a low-rank
        # v_proj): without a ridge, the smallest one that makes it factor (the null space carries no output).
        for tried in dict.fromkeys([lam, max(lam, SINGULAR_RIDGE)]):
            try:
                return (*reduced_rank_fit(w, on["gram_hat"], on["cross"], module.rank, ridge=tried,
                                          anchor=q0 @ p0, pull=errors[id(on)].pull), tried)
            except torch.linalg.LinAlgError as exc:
                entry["refactor_skipped"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None

    def solve(lam: float, p_: torch.Tensor, q_: torch.Tensor, on: dict[str, torch.Tensor]) -> torch.Tensor:
        return solve_coefficients(errors[id(on)].pull, p_, on["gram_hat"], ridge=lam, anchor=q_)[0]

    entry: dict[str, Any] = {"group": plan.key, "layer": i, "rank": module.rank,
                             "objective_before": error(q0, p0, total)}
    lams = list(dict.fromkeys([ridge] + [lam for lam in RIDGE_GRID if lam > ridge])) if held else [ridge]
    # Choose on the fit windows, judged on `judge`: (q, p) follow the chain of accepted changes.
    q, p = q0, p0
    current = error(q, p, judge)
    if held:
        entry["held_out_before"] = current
    refit_lam = update_lam = None
    if sequential and len(plan.layers) == 1:
        chosen = _choose(lams, lambda lam: refit(lam, fit), lambda f: error(f[0], f[1], judge), current)
        entry["refactored"] = chosen is not None
        if chosen is not None:
            entry.pop("refactor_skipped", None)
            refit_lam, (q, p, entry["refactor_ridge"]), current = chosen
    if update == "closed-form":
        q_start = q
        chosen = _choose(lams, lambda lam: solve(lam, p, q_start, fit), lambda c: error(c, p, judge), current)
        entry["updated"] = chosen is not None
        if chosen is not None:
            update_lam, q, current = chosen
            entry["ridge"] = update_lam
    if held:  # the accepted steps again, on all windows with the chosen λ
        entry["held_out_after"] = current
        q, p = q0, p0
        if refit_lam is not None:
            q, p, entry["refactor_ridge"] = refit(refit_lam, total)
        if update_lam is not None:
            q = solve(update_lam, p, q, total)
    if refit_lam is not None or update_lam is not None:
        with torch.no_grad():
            module.basis.weight.copy_(p)
            module.coef.weight.copy_(q)
    entry["objective_after"] = error(q, p, total)
    entry["time_s"] = round(shared_s + time.perf_counter() - t0, 4)
    return entry
