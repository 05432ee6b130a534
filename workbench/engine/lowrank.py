"""The module that replaces `nn.Linear`: y = Q(P(x)) + b, with P possibly shared by a group.

The two factors are `nn.Linear` children, `basis` (in → rank, weight P) and `coef` (rank → out,
weight Q), so that module-level tools (peft's LoRA, hooks) can target each factor by name. A basis
shared by the layers of a group is one `nn.Linear` object held by every layer.

State dicts name the factors `<module>.basis.weight` and `<module>.coef.weight`. State dicts of
the earlier layout, where P and Q were Parameters named `<module>.basis` and `<module>.coef` (the
names still used on disk, storage/saving.py), load too: they are renamed on the way in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init


def factor_linear(in_features: int, out_features: int, dtype: torch.dtype | None = None, device=None,
                  weight: torch.Tensor | None = None) -> nn.Linear:
    """A bias-free nn.Linear for one factor; uninitialised (no RNG drawn) unless `weight` is given.

    A given `nn.Parameter` is used as is (so two factors can hold the same one), a plain tensor is wrapped.
    """
    device = torch.get_default_device() if device is None else device  # skip_init would leave it on "meta"
    linear = skip_init(nn.Linear, in_features, out_features, bias=False, dtype=dtype, device=device)
    if weight is not None:
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {(out_features, in_features)}")
        linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return linear


class LowRankLinear(nn.Module):
    """W ≈ Q·P. `basis` (P, rank×in) may be the same nn.Linear object in every layer of a group.

    `basis` may also be given as a Parameter (the earlier interface): it is wrapped in a Linear of its own,
    holding that same Parameter.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 basis: nn.Linear | nn.Parameter | None = None, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        if basis is None or isinstance(basis, torch.Tensor):
            basis = factor_linear(in_features, rank, dtype=dtype, device=device, weight=basis)
        if tuple(basis.weight.shape) != (rank, in_features):
            raise ValueError(f"basis has shape {tuple(basis.weight.shape)}, expected {(rank, in_features)}")
        self.basis = basis  # P
        self.coef = factor_linear(rank, out_features, dtype=dtype, device=device)  # Q
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    # `weight` keeps code that inspects linear layers (and dtype/device probes) working.
    @property
    def weight(self) -> torch.Tensor:
        return self.coef.weight @ self.basis.weight

    def as_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """An nn.Linear with `weight` (default Q·P, formed in at least float32) and this module's bias."""
        q, p = self.coef.weight, self.basis.weight
        if weight is None:
            compute = torch.promote_types(q.dtype, torch.float32)
            weight = q.detach().to(compute) @ p.detach().to(compute)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=q.dtype, device=q.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Through the children (not their weights), so a wrapper put on a factor (a LoRA adapter) takes part.
        y = self.coef(self.basis(x))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def _rename_old_keys(module, state_dict, prefix, *_args) -> None:
    """`<prefix>basis` / `<prefix>coef` (factors as Parameters) → `<prefix>basis.weight` / `<prefix>coef.weight`."""
    for name in ("basis", "coef"):
        if prefix + name in state_dict and prefix + name + ".weight" not in state_dict:
            state_dict[prefix + name + ".weight"] = state_dict.pop(prefix + name)
