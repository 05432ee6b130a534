"""The "fisher" signal: how much the dense model's loss rises when one component of a group is dropped.

For component i of a group (A = W_g L = U Σ Vᵀ the whitened weight), dropping it changes W_g by
−σ_i u_i v_iᵀ L⁻¹, so per calibration window b the first-order change of the loss is −s_{b,i} with
s_{b,i} = σ_i·u_iᵀ G_b (v_iᵀL⁻¹)ᵀ, where G_b = ∂L_b/∂W_g is the gradient of the dense model's mean
token loss on that window (rows of U per layer pair with that layer's gradient). At a trained model
the mean of s is near zero; the second-order (empirical Fisher) estimate F_i = ½·mean_b s_{b,i}² is
what we return, one value per kept component.

Cost: one forward and one backward pass per batch of windows, the backward computing input
gradients only (no weight gradients), plus r·(in + out) multiply-adds per token and targeted
matrix for the projections (`fisher_scores`): ≈3 forward passes per window. Under bf16 autocast
where the hardware multiplies bf16 natively (`resolve_precision`), which halves the pass on such a
CPU and costs ~2% of each score, far below what the choice of windows moves it (docs/speed.md).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from workbench.api import Option, Signal, SignalContext, all_reduce_sum, process_share


PRECISIONS = ("auto", "bfloat16", "float32")
# x86 instruction sets with bf16 dot products; an arm64 CPU's "bf16" is left out until measured.
NATIVE_BF16_CPU = ("avx512_bf16", "amx_bf16")


def resolve_precision(precision: str, device) -> str:
    """"bfloat16" (autocast) or "float32" for `precision` on `device`; "auto" by the hardware, never timed.

    bf16 where it multiplies natively: CUDA GPUs of compute capability ≥ 8.0 (A100, H100, RTX 30xx
    and later) and x86 CPUs with AVX512-BF16 or AMX-BF16, where a bf16 matrix product measured 4×
    a float32 one (docs/speed.md). Elsewhere (older GPUs, CPUs that would emulate it) float32.
    A model already in bf16/fp16 runs as it is either way."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown Fisher precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float32"
    if device.type == "cpu":
        return "bfloat16" if _cpu_multiplies_bf16() else "float32"
    return "float32"


def _cpu_multiplies_bf16() -> bool:
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return any(capabilities().get(name) for name in NATIVE_BF16_CPU)
    # a torch before get_capabilities (the project allows ≥ 2.4): its private probes of the same features
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def fisher_scores(model, adapter, plans: Sequence[Any], factors: Mapping[str, Any], windows, device, events,
                  cancel, stage: str = "sensitivity", per_pass: int | None = None,
                  precision: str = "auto") -> dict[str, Any]:
    """{group key: F (float64, one per kept component)}: one forward and one backward pass per batch of windows.

    No weight gradient is formed. For a targeted linear y = x Wᵀ (+ b) with inputs X_b and output
    gradients Δ_b on window b, ∂L_b/∂W = Δ_bᵀX_b, so s_{b,i} = σ_i·Σ_t (Δ_b U)_{t,i}·(X_b P)_{t,i}
    with U the layer's rows of the group's U and P = (VᵀL⁻¹)ᵀ: a forward hook keeps X_b P, a hook on
    the output's gradient finishes the sum per window. Only the embeddings' output requires a
    gradient, so the backward pass computes input gradients alone (no weight, embedding or lm_head
    gradients). Windows are batched `per_pass` at a time (default: `windows_per_pass`); the loss
    is the sum of the windows' mean token losses, so each window's Δ_b is its own loss's gradient.
    `precision` as `resolve_precision` takes it; under bf16 the per-token products are summed in float32.
    """
    import torch
    from torch.nn import functional as F

    layers = adapter.decoder_layers(model)
    n_all = windows.shape[0]
    mine = process_share(n_all)  # under torchrun: this process's windows; the sums are added at the end
    windows = windows[mine.start:mine.stop]
    n = windows.shape[0]
    per_pass = per_pass or windows_per_pass(model, windows.shape[1], device, n)
    bf16 = resolve_precision(precision, device) == "bfloat16"
    current: dict[str, torch.Tensor] = {}  # per window of this pass: Σ_t (ΔU)·(XP), before σ
    total: dict[str, torch.Tensor] = {}
    handles = []

    def watch(plan, row: int, f):
        u = f.u[row * plan.out_features:(row + 1) * plan.out_features].to(device)  # out × r
        p = f.vt_linv.to(device).mT  # in × r

        def forward_hook(module, args, output):
            x = args[0].detach()
            dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 activations: float32 sums
            xp = x.to(dtype) @ p.to(dtype)  # windows × tokens × r (bf16 under autocast)

            def grad_hook(grad):
                gu = grad.to(dtype) @ u.to(dtype)
                current[plan.key] += (gu.to(dtype) * xp.to(dtype)).sum(dim=-2).to(torch.float64)

            if output.requires_grad:
                output.register_hook(grad_hook)

        return layers[plan.layers[row]].get_submodule(plan.site.path).register_forward_hook(forward_hook)

    def needs_grad(module, args, output):
        return output.detach().requires_grad_(True)

    for plan in plans:
        total[plan.key] = torch.zeros(factors[plan.key].u.shape[1], dtype=torch.float64, device=device)
        handles += [watch(plan, row, factors[plan.key]) for row in range(len(plan.layers))]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    params = list(model.parameters())
    was_trainable = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        for start in range(0, n, per_pass):
            cancel.check()
            ids = windows[start:start + per_pass].to(device)
            for plan in plans:
                current[plan.key] = torch.zeros(ids.shape[0], total[plan.key].numel(), dtype=torch.float64,
                                                device=device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids, use_cache=False).logits
                token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1), reduction="none")
                token_loss.view(ids.shape[0], -1).mean(dim=1).sum().backward()
            del logits, token_loss
            for plan in plans:
                sigma = factors[plan.key].singular_values[:total[plan.key].numel()].to(device)
                total[plan.key] += ((sigma * current[plan.key]) ** 2).sum(dim=0)
            events.progress(stage, min(start + per_pass, n), n, data={"unit": "window"})
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, was_trainable):
            p.requires_grad_(flag)
    total = all_reduce_sum(total)  # float64 sums, group by group in plan order
    return {key: (0.5 * t / max(n_all, 1)).cpu() for key, t in total.items()}


def windows_per_pass(model, seq_len: int, device, available: int) -> int:
    """How many windows one forward/backward pass takes: as many as fit in a quarter of free CUDA memory.

    Per token a window keeps ≈3·vocab float32 elements (logits and their gradient) and ≈20·hidden +
    4·intermediate per decoder layer for the backward pass (an estimate, on the high side). Batching
    saves no multiply-adds, only makes the products larger, which pays on a GPU; a CPU runs one
    window per pass and keeps the peak memory of one window.
    """
    import torch

    if torch.device(device).type != "cuda":
        return 1
    config = model.config
    hidden = getattr(config, "hidden_size", 4096)
    per_token = 3 * getattr(config, "vocab_size", 32000) + getattr(config, "num_hidden_layers", 32) * (
        20 * hidden + 4 * getattr(config, "intermediate_size", 4 * hidden))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(available, int(free // 4 // (4 * per_token * seq_len))))


class FisherSignal(Signal):
    name = "fisher"
    description = ("per kept component: ½·mean over windows of (σ_i·u_iᵀ ∂L/∂A v_i)², the dense model's "
                   "loss increase for dropping it (one backward pass per window)")
    options = (
        Option("windows", int, 8, min=1, max=4096,
               help="calibration windows used for the gradient pass (each costs ~3 forward passes)"),
        Option("precision", str, "auto", choices=PRECISIONS,
               help="the gradient pass's arithmetic: bf16 autocast or float32; auto: bf16 where the device "
                    "multiplies it natively (docs/speed.md)"),
    )

    def compute(self, ctx: SignalContext) -> dict[str, Any]:
        windows = ctx.windows[:max(1, int(ctx.options.get("windows", 8)))]
        precision = resolve_precision(ctx.options.get("precision", "auto"), ctx.device)
        ctx.notes.update(windows=int(windows.shape[0]), precision=precision)
        ctx.events.log(ctx.stage, f"fisher: {windows.shape[0]} windows, {precision} "
                                  f"({'bf16 autocast' if precision == 'bfloat16' else 'no autocast'})")
        return fisher_scores(ctx.model, ctx.adapter, ctx.plans, ctx.factors, windows, ctx.device, ctx.events,
                             ctx.cancel, ctx.stage, precision=precision)
