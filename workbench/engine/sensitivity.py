"""Signals that measure what a truncation does to the model's loss, for allocators that ask (`needs`).

"fisher": for component i of a group (A = W_g L = U Σ Vᵀ the whitened weight), dropping it changes
W_g by −σ_i u_i v_iᵀ L⁻¹, so per calibration window b the first-order change of the loss is
−s_{b,i} with s_{b,i} = σ_i·u_iᵀ G_b (v_iᵀL⁻¹)ᵀ, where G_b = ∂L_b/∂W_g is the gradient of the dense
model's mean token loss on that window (rows of U per layer pair with that layer's gradient). At a
trained model the mean of s is near zero; the second-order (empirical Fisher) estimate
F_i = ½·mean_b s_{b,i}² is what we return, one value per kept component.

Cost: one forward and one backward pass of the whole model per window (≈3 forward passes), plus
r·out·in multiply-adds per targeted matrix per window for the projections. Gradients are consumed
by a hook as soon as each weight's is ready, so no full set of gradients is ever held.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from workbench.events import CancelToken, EventBus
from workbench.engine.factorize import GroupFactors
from workbench.engine.grouping import GroupPlan
from workbench.api import SIGNALS, Adapter, GroupSpectrum


def fisher_scores(model: nn.Module, adapter: Adapter, plans: Sequence[GroupPlan], factors: dict[str, GroupFactors],
                  windows: torch.Tensor, device: torch.device, events: EventBus, cancel: CancelToken
                  ) -> dict[str, torch.Tensor]:
    """{group key: F (float64, one per kept component)} from one backward pass per window."""
    layers = adapter.decoder_layers(model)
    params = list(model.parameters())
    was_trainable = [p.requires_grad for p in params]
    per_window: dict[str, torch.Tensor] = {}
    total: dict[str, torch.Tensor] = {}
    handles = []

    def projector(plan: GroupPlan, row: int, f: GroupFactors):
        u = f.u[row * plan.out_features:(row + 1) * plan.out_features].to(device)  # out × r
        vt = f.vt_linv.to(device)  # r × in

        def hook(param: torch.Tensor) -> None:
            g = param.grad.to(u.dtype)
            # diag(U_lᵀ G V_tᵀ): r values, without forming the r×r product
            per_window[plan.key] += ((u.mT @ g) * vt).sum(dim=1).double()
            param.grad = None

        return hook

    try:
        for p in params:
            p.requires_grad_(False)
        for plan in plans:
            f = factors[plan.key]
            per_window[plan.key] = torch.zeros(f.u.shape[1], dtype=torch.float64, device=device)
            total[plan.key] = torch.zeros_like(per_window[plan.key])
            for row, i in enumerate(plan.layers):
                weight = layers[i].get_submodule(plan.site.path).weight
                weight.requires_grad_(True)
                handles.append(weight.register_post_accumulate_grad_hook(projector(plan, row, f)))
        n = windows.shape[0]
        for b in range(n):
            cancel.check()
            ids = windows[b:b + 1].to(device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            for plan in plans:
                sigma = factors[plan.key].singular_values[:per_window[plan.key].numel()].to(device)
                total[plan.key] += (sigma * per_window[plan.key]) ** 2
                per_window[plan.key].zero_()
            events.progress("sensitivity", b + 1, n, data={"unit": "window"})
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, was_trainable):
            p.requires_grad_(flag)
            p.grad = None
    return {key: (0.5 * t / max(windows.shape[0], 1)).cpu() for key, t in total.items()}


def attach_signals(names: Sequence[str], spectra: Sequence[GroupSpectrum], model: nn.Module, adapter: Adapter,
                   plans: Sequence[GroupPlan], factors: dict[str, GroupFactors], windows: torch.Tensor,
                   device: torch.device, events: EventBus, cancel: CancelToken) -> None:
    """Compute each requested signal and put it into every spectrum's `sensitivity`."""
    for name in names:
        if name not in SIGNALS:
            raise ValueError(f"unknown signal '{name}' (known: {', '.join(SIGNALS)})")
        put_signals(spectra, {name: fisher_scores(model, adapter, plans, factors, windows, device, events, cancel)})


def put_signals(spectra: Sequence[GroupSpectrum], signals: dict[str, dict[str, torch.Tensor]]) -> None:
    """Give every spectrum its value of each signal ({signal: {group key: tensor}})."""
    for spec in spectra:
        spec.sensitivity = {**spec.sensitivity, **{name: by_key[spec.key] for name, by_key in signals.items()}}


def signal_window_count(options, available: int) -> int:
    """Windows for the gradient pass: the allocator's `fisher_windows` option if it declares one."""
    wanted = options.get("fisher_windows") if hasattr(options, "get") else None
    return max(1, min(available, int(wanted))) if wanted else available
