"""The "ara" signal: rank masks trained with the model's own loss (after ARA, arXiv 2510.19389).

Per group g with break-even rank r (`max_rank`: at r the layers stay dense), trainable logits
θ ∈ R^r give a distribution p = softmax(θ) over r positions: position j < r is "keep j
components", position r is "dense". The mask over components is the probability of being kept,

    m_i = Σ_{j ≥ i} p_j        (i = 1..r; m_1 = 1, and m_r = p_r, the dense share),

non-increasing over the singular values by construction, and every logit feels the whole spectrum:
∂m_i/∂θ_l = p_l·([l ≥ i] − m_i) is non-zero for every i, l (a tanh or sigmoid per component only
sees its neighbours). The masked layer computes

    y = m_r·W x + U diag(σ ⊙ (m − m_r)) Vᵀ L⁻¹ x + b,

i.e. the components past break-even (and the r-th) are weighted by the dense share: at p_r = 1 the
layer is exactly the dense one, as it will be after allocation. That is how the gain's jump at
compression ratio 1 is in the training: the dense point is a point of the simplex, not a limit.
The dense weight is the model's own (frozen), so no copy is made.

Loss per step (one calibration window, cycled):
    task:      the model's mean token cross-entropy through the masked layers;
    budget:    λ_b·(C/T − 1)², C = Σ_g E_p[cost_g] with cost_g(j) = j·ω_g (j < r), n·in·out (j = r),
               exactly what the allocator will be charged; T the run's budget;
    guidance:  λ_g·Σ_g (D_g/D)·a_g·(−log p_r,g), a_g = max(0, s_g − s̄)/(1 − s̄) with s_g = E[cost_g]/D_g
               the group's expected share of its dense parameters and s̄ = T/D the run's: a group that
               already pays more than the average share is pulled toward the exact dense matrix it
               nearly pays for (softmax alone gives the dense position a gradient ∝ p_r, which is
               near zero from a low-rank start). a_g is not differentiated.
The paper's exact guidance and compression terms were not reachable from here; these are this
project's (docs/allocators.md, "ara").

Resumable: logits and Adam state are saved every `checkpoint_every` steps through
`SignalContext.checkpoint`; a resumed run goes on from the last save and ends with the same masks
as an uninterrupted one (windows are taken in a fixed order, nothing is random).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from workbench.api import (GroupSpectrum, Option, Signal, SignalContext, UsageError, break_even_rank,
                           fill_to_budget, uniform_ranks, validate_options)

#: Width of the initial distribution around the initial rank, as a fraction of r: a soft step.
INIT_WIDTH = 1.0 / 16
#: Options that do not change the result: a checkpoint written with other values is still valid.
NOT_IN_RESULT = ("checkpoint_every",)


def rank_mask(logits):
    """m_i = Σ_{j≥i} softmax(θ)_j over the last dimension: non-increasing, m_1 = 1, m_r = p_r."""
    import torch

    p = torch.softmax(logits, dim=-1)
    return p.flip(-1).cumsum(-1).flip(-1)


def position_costs(r: int, omega: int, dense: int, dtype=None):
    """Parameters of each position: j·ω for j = 1..r−1 components, the dense weights at j = r."""
    import torch

    costs = torch.arange(1, r + 1, dtype=torch.float64) * omega
    costs[-1] = dense
    return costs if dtype is None else costs.to(dtype)


def initial_logits(r: int, k0: int):
    """A soft step at rank k0 (k0 = r: dense): p_j ∝ exp(−|j − k0| / (r·INIT_WIDTH))."""
    import torch

    j = torch.arange(1, r + 1, dtype=torch.float32)
    return -(j - float(k0)).abs() / max(1.0, r * INIT_WIDTH)


def _group_spectra(plans, factors) -> list[GroupSpectrum]:
    return [GroupSpectrum(key=p.key, matrix_type=p.matrix_type, layers=tuple(p.layers), in_features=p.in_features,
                          out_features=p.out_features, singular_values=factors[p.key].singular_values)
            for p in plans]


def initial_ranks(ctx: SignalContext, groups: Sequence[GroupSpectrum], budget: int) -> dict[str, int]:
    """Where training starts: uniform ranks, or the registered "loss-aware" allocator's with its defaults.

    Both the allocator and the signals it needs come from the run's registry (`ctx.plugin`), not from
    imports of the built-ins, so a replacement registered under those names is the one used. A signal
    that declares a `windows` option gets `init_windows`.
    """
    if ctx.options.get("init", "uniform") == "uniform":
        return uniform_ranks(groups, budget)
    allocator = ctx.plugin("allocator", "loss-aware")
    init_windows = int(ctx.options.get("init_windows", 8))
    for name in allocator.needs:
        declared = {o.name for o in ctx.plugin("signal", name).options}
        values = ctx.signal(name, {"windows": init_windows} if "windows" in declared else None)
        for g in groups:
            g.sensitivity = {**g.sensitivity, name: values[g.key]}
    options, problems = validate_options(allocator.options, {}, file="<signals>", key_prefix="signals.ara.init")
    if problems:  # a replacement whose options have no defaults
        raise UsageError("; ".join(f"{p.key}: {p.message}" for p in problems))
    return fill_to_budget(groups, dict(allocator.allocate(groups, budget, options)), budget)


def _masked_linear_class():
    from torch import nn
    from torch.nn import functional as F

    class MaskedLinear(nn.Module):
        """One layer of a group during training: dense share of W plus the masked low-rank part."""

        def __init__(self, dense: nn.Linear, u, p, sigma, logits):
            super().__init__()
            self._dense = (dense,)  # a tuple: not a submodule, so its frozen weights stay out of the way
            self._logits = (logits,)
            self.u, self.p, self.sigma = u, p, sigma  # out × (r−1), in × (r−1), r−1

        def forward(self, x):
            dense = self._dense[0]
            m = rank_mask(self._logits[0]).to(x.dtype)
            share = m[-1]
            y = share * F.linear(x, dense.weight)
            if self.u.shape[1]:
                low = (x @ self.p.to(x.dtype)) * (self.sigma.to(x.dtype) * (m[:self.u.shape[1]] - share))
                y = y + low @ self.u.to(x.dtype).mT
            return y if dense.bias is None else y + dense.bias

    return MaskedLinear


def _layers_prefix(model, layers) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise UsageError("the adapter's decoder layers are not a submodule of the model")


class _Plan:
    """What training needs per group: its positions' costs and where its layers are."""

    def __init__(self, plan, factors):
        self.key = plan.key
        self.plan = plan
        self.r = break_even_rank(plan.in_features, plan.out_features, len(plan.layers))
        self.omega = plan.in_features + len(plan.layers) * plan.out_features
        self.dense = len(plan.layers) * plan.in_features * plan.out_features
        self.factors = factors[plan.key]


def train_masks(ctx: SignalContext, budget: int, init_ranks: Mapping[str, int] | None = None) -> dict[str, Any]:
    """{group key: the trained mask m (float64, r values; the last is the dense share)}."""
    import torch
    from torch.nn import functional as F

    options = ctx.options
    steps, every = int(options.get("steps", 100)), int(options.get("checkpoint_every", 25))
    lr, budget_weight = float(options.get("lr", 0.1)), float(options.get("budget_weight", 10.0))
    guidance = float(options.get("guidance", 0.1))
    windows = ctx.windows[:max(1, int(options.get("windows", 16)))]
    device = ctx.device
    plans = [_Plan(p, ctx.factors) for p in ctx.plans]
    total_dense = float(sum(g.dense for g in plans))
    target_share = budget / total_dense if total_dense else 1.0
    result_options = {k: v for k, v in sorted(options.items()) if k not in NOT_IN_RESULT}
    meta_expected = {"options": result_options, "budget": int(budget), "keys": [g.key for g in plans],
                     "r": [g.r for g in plans]}

    logits = [torch.nn.Parameter(torch.zeros(g.r, device=device)) for g in plans]
    optimizer = torch.optim.Adam(logits, lr=lr)
    start = _resume(ctx.checkpoint, meta_expected, logits, optimizer, device)
    if start is None:
        start = 0
        if init_ranks is None:
            init_ranks = initial_ranks(ctx, _group_spectra(ctx.plans, ctx.factors), budget)
        with torch.no_grad():
            for g, theta in zip(plans, logits):
                theta.copy_(initial_logits(g.r, min(g.r, max(1, int(init_ranks[g.key])))))
    else:
        ctx.events.log(ctx.stage, f"ara: resuming mask training at step {start}/{steps}")

    costs = [position_costs(g.r, g.omega, g.dense).to(device) for g in plans]
    weights = torch.tensor([g.dense / total_dense for g in plans], dtype=torch.float64, device=device)
    dense_params = torch.tensor([float(g.dense) for g in plans], dtype=torch.float64, device=device)
    modules = _masked_modules(ctx, plans, logits)
    params = list(ctx.model.parameters())
    trainable = [p.requires_grad for p in params]
    if start < steps:
        ctx.events.log(ctx.stage, f"ara: training the masks of {len(plans)} groups, {steps} steps over "
                                  f"{windows.shape[0]} windows (budget {budget:,} parameters)")
    try:
        for p in params:
            p.requires_grad_(False)
        with ctx.swapped(modules) as model:
            for step in range(start, steps):
                ctx.cancel.check()
                ids = windows[step % windows.shape[0]].unsqueeze(0).to(device)
                with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                         enabled=device.type == "cuda"):
                    out = model(input_ids=ids, use_cache=False).logits
                    task = F.cross_entropy(out[0, :-1].float(), ids[0, 1:])
                probs = [torch.softmax(theta, dim=-1).double() for theta in logits]
                expected = torch.stack([pr @ c for pr, c in zip(probs, costs)])
                spent = expected.sum()
                loss = task + budget_weight * (spent / budget - 1.0) ** 2
                if guidance > 0:
                    share = (expected / dense_params).detach()
                    pull = ((share - target_share).clamp(min=0) / max(1e-6, 1.0 - target_share))
                    dense_log = torch.stack([torch.log_softmax(theta, dim=-1)[-1].double() for theta in logits])
                    loss = loss + guidance * (weights * pull * -dense_log).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                del out
                ratio, task_loss = 1.0 - float(spent.detach()) / total_dense, float(task.detach())
                done = step + 1
                ctx.events.progress(ctx.stage, done, steps, f"loss {task_loss:.4f} · ratio {ratio:.3f}",
                                    data={"unit": "step", "loss": task_loss, "ratio": ratio})
                if done % every == 0 or done == steps:
                    if ctx.checkpoint is not None:
                        _save(ctx.checkpoint, meta_expected, logits, optimizer, done)
                    ctx.events.log(ctx.stage, f"ara: step {done}/{steps}, loss {task_loss:.4f}, "
                                              f"ratio {ratio:.3f} (target {1 - target_share:.3f})")
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    with torch.no_grad():
        return {g.key: rank_mask(theta.detach()).double().cpu() for g, theta in zip(plans, logits)}


def _masked_modules(ctx: SignalContext, plans: Sequence[_Plan], logits) -> dict[str, Any]:
    MaskedLinear = _masked_linear_class()
    layers = ctx.adapter.decoder_layers(ctx.model)
    prefix = _layers_prefix(ctx.model, layers)
    modules = {}
    for g, theta in zip(plans, logits):
        f = g.factors
        low = max(0, min(g.r - 1, f.u.shape[1]))  # components r.. weigh with the dense share
        p = f.vt_linv[:low].to(ctx.device).mT
        sigma = f.singular_values[:low].to(ctx.device, dtype=p.dtype)
        for row, index in enumerate(g.plan.layers):
            dense = layers[index].get_submodule(g.plan.site.path)
            u = f.u[row * g.plan.out_features:(row + 1) * g.plan.out_features, :low].to(ctx.device)
            path = f"{prefix}.{index}.{g.plan.site.path}" if prefix else f"{index}.{g.plan.site.path}"
            modules[path] = MaskedLinear(dense, u, p, sigma, theta)
    return modules


def _save(store, meta: dict[str, Any], logits, optimizer, done: int) -> None:
    import torch

    tensors = {"done": torch.tensor([done], dtype=torch.int64)}  # with the tensors: the file may be newer than meta
    state = optimizer.state_dict()["state"]
    for i, theta in enumerate(logits):
        tensors[f"logits.{i}"] = theta.detach().cpu()
        for name, value in state.get(i, {}).items():
            value = value if hasattr(value, "detach") else torch.tensor(float(value))
            tensors[f"{name}.{i}"] = value.detach().cpu().reshape(-1)  # 1-d: the step is a 0-d tensor
    store.save(meta, tensors)


def _resume(store, expected: Mapping[str, Any], logits, optimizer, device) -> int | None:
    """The step to go on from when the store holds a compatible save (logits and Adam state loaded)."""
    import torch

    saved = store.load() if store is not None else None
    if saved is None:
        return None
    meta, tensors = saved
    if any(meta.get(k) != v for k, v in expected.items()) or "done" not in tensors:
        return None
    state = {}
    with torch.no_grad():
        for i, theta in enumerate(logits):
            theta.copy_(tensors[f"logits.{i}"].to(device))
            if f"step.{i}" in tensors:
                state[i] = {"step": tensors[f"step.{i}"].reshape(()).to(torch.float32),
                            **{name: tensors[f"{name}.{i}"].to(device) for name in ("exp_avg", "exp_avg_sq")}}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return int(tensors["done"][0])


class AraSignal(Signal):
    name = "ara"
    depends_on_target = True  # trained toward the run's budget: a sweep cannot share it across ratios
    description = ("per group: a rank mask trained with the model's loss through the masked factors, a budget "
                   "term and a guidance term toward dense at break-even (ARA); the `ara` allocator rounds it")
    options = (
        Option("steps", int, 100, min=1, max=1_000_000,
               help="optimizer steps, one calibration window each (a forward and backward pass of the model)"),
        Option("lr", float, 0.1, min=1e-6, max=10.0, help="Adam learning rate of the mask logits"),
        Option("windows", int, 16, min=1, max=65536, help="calibration windows cycled through (the first that many)"),
        Option("budget_weight", float, 10.0, min=0.0, max=1e6,
               help="λ_b of the budget term λ_b·(expected parameters / budget − 1)²"),
        Option("guidance", float, 0.1, min=0.0, max=1e3,
               help="λ_g of the guidance term toward dense for groups above the average kept share (0: off)"),
        Option("init", str, "uniform", choices=("uniform", "loss-aware"),
               help="where the masks start: uniform ranks, or the loss-aware allocator's (one Fisher pass)"),
        Option("init_windows", int, 8, min=1, max=4096, help="windows of the Fisher pass for init = 'loss-aware'"),
        Option("checkpoint_every", int, 25, min=1, max=1_000_000,
               help="steps between checkpoints of the masks and optimizer state (a resumed run goes on from there)"),
    )

    def compute(self, ctx: SignalContext) -> dict[str, Any]:
        budget = ctx.budget
        if budget is None:
            if ctx.ratio is None:
                raise UsageError("the 'ara' signal needs the run's budget: SignalContext.budget or .ratio")
            dense = sum(len(p.layers) * p.in_features * p.out_features for p in ctx.plans)
            budget = math.floor((1.0 - ctx.ratio) * dense)
        return train_masks(ctx, int(budget))
