"""The module that replaces `nn.Linear`: y = (x Pᵀ) Qᵀ + b, with P possibly shared by a group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """W ≈ Q·P. P (rank×in) may be the same Parameter object in every layer of a group."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 basis: nn.Parameter | None = None, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        if basis is None:
            basis = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        if tuple(basis.shape) != (rank, in_features):
            raise ValueError(f"basis has shape {tuple(basis.shape)}, expected {(rank, in_features)}")
        self.basis = basis  # P
        self.coef = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))  # Q
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # `weight` keeps code that inspects linear layers (and dtype/device probes) working.
    @property
    def weight(self) -> torch.Tensor:
        return self.coef @ self.basis

    def as_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """An nn.Linear with `weight` (default Q·P, formed in at least float32) and this module's bias."""
        if weight is None:
            compute = torch.promote_types(self.coef.dtype, torch.float32)
            weight = self.coef.detach().to(compute) @ self.basis.detach().to(compute)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.coef.dtype, device=self.coef.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.basis), self.coef, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
