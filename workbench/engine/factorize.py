"""Grouped SVD of whitened weights: one shared input basis P_g, one output factor Q⁽ˡ⁾ per layer.

For a group of n layers of one matrix type, W_g = [W⁽¹⁾; …; W⁽ⁿ⁾] (n·out × in) is whitened with the
group's summed Gram, A = W_g L = U Σ Vᵀ, and rank k keeps Q = U_k Σ_k^{1/2}, P = Σ_k^{1/2} V_kᵀ L⁻¹.
The whitened loss at rank k is exactly Σ_{i>k} σ_i² (Eckart–Young), the engine's built-in check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from workbench.engine.whitening import Whitening, whitening_factor


@dataclass
class GroupFactors:
    """The SVD of one group's whitened matrix, truncated at the largest rank worth keeping."""

    singular_values: torch.Tensor  # all of them, float64, descending
    u: torch.Tensor  # n·out × r: float64 from the SVD, float32 after `compact`
    vt_linv: torch.Tensor  # r × in: V_rᵀ L⁻¹, float64 from the SVD, float32 after `compact`
    out_features: int
    whitening: Whitening

    def compact(self, dtype: torch.dtype = torch.float32) -> "GroupFactors":
        """Keep the vectors in `dtype` once checked: halves what waits for allocation.

        The whitening factor L (in×in, float64) is dropped too: it was only needed for V_rᵀL⁻¹
        and the loss check, and kept until allocation it would cost more than the factors of a
        wide input (a 7B model's down_proj: 0.97 GB per layer). Its report fields stay.
        """
        self.u = self.u.to(dtype)
        self.vt_linv = self.vt_linv.to(dtype)
        self.whitening = dataclasses.replace(self.whitening, factor=self.whitening.factor.new_empty(0),
                                             _root=None, _inverse_root=None)
        return self

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(Q per layer, shared P) at `rank`, split Σ^{1/2} evenly between the two factors."""
        if not 1 <= rank <= self.u.shape[1]:
            raise ValueError(f"rank {rank} outside [1, {self.u.shape[1]}]")
        root = self.singular_values[:rank].sqrt()
        q = self.u[:, :rank].to(root.dtype) * root
        p = root[:, None] * self.vt_linv[:rank].to(root.dtype)
        qs = [block.to(dtype).clone() for block in q.split(self.out_features, dim=0)]
        return qs, p.to(dtype).contiguous()


def _svd_by_eigh(a: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `a` from the eigendecomposition of its smaller Gram matrix (float64).

    Three to four times faster than LAPACK's SVD on a CPU. Squaring costs relative accuracy only
    for σ_i below ~1e-8·σ_1, far past any rank worth keeping; their σ_i² (all the loss needs) stay
    accurate to float64 rounding of the total energy. Returns (σ, U_keep, V_keepᵀ).
    """
    wide = a.shape[0] <= a.shape[1]
    evals, evecs = torch.linalg.eigh(a @ a.mT if wide else a.mT @ a)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    s = evals.sqrt()
    keep = min(keep, s.numel())
    # Components at rounding level carry no signal: zero them rather than amplify noise by 1/σ.
    live = s[:keep] > s[0] * 1e-10
    inv = torch.where(live, 1.0 / s[:keep].where(live, torch.ones_like(s[:keep])), torch.zeros_like(s[:keep]))
    if wide:  # eigenvectors are U; V_kᵀ = Σ_k⁻¹ U_kᵀ A
        u = evecs[:, :keep]
        vt = inv[:, None] * (u.mT @ a)
    else:  # eigenvectors are V; U_k = A V_k Σ_k⁻¹
        vt = evecs[:, :keep].mT
        u = (a @ evecs[:, :keep]) * inv
    return s, u, vt


def whitened_svd(weights: list[torch.Tensor], gram: torch.Tensor, keep: int, method: str = "cholesky",
                 overwrite: bool = False) -> GroupFactors:
    """SVD of [W⁽¹⁾; …; W⁽ⁿ⁾]·L, keeping the first `keep` components' vectors (all singular values).

    `overwrite`: `gram` is not read again by the caller and may become L (`whitening_factor`).
    """
    white = whitening_factor(gram, method, overwrite)
    stacked = torch.cat([w.detach().to(device=gram.device, dtype=torch.float64) for w in weights], dim=0)
    a = white.apply(stacked)
    del stacked  # n·out × in float64: not needed past this point, freed before the SVD's own buffers
    if a.is_cuda:  # GPU SVD is fast and exact enough; the eigh shortcut pays on CPUs
        u, s, vt = torch.linalg.svd(a, full_matrices=False)
        keep = min(keep, s.numel())
        u, vt = u[:, :keep], vt[:keep].clone()  # its own memory: V_rᵀ becomes V_rᵀL⁻¹ in place below
    else:
        s, u, vt = _svd_by_eigh(a, keep)
        keep = u.shape[1]
    del a  # like the stacked weights: not held while V_rᵀ L⁻¹ is formed
    vt_linv = white.right_inverse_(vt)
    return GroupFactors(s, u.contiguous(), vt_linv, weights[0].shape[0], white)


# Rows of W_g per block of the loss check: its temporaries are a few blocks of rows × in (float64),
# not several copies of the whole n·out × in matrix (1.4 GB at a 7B down_proj, the factoring's peak).
CHECK_ROWS = 1024


def measured_loss(weights: list[torch.Tensor], factors: GroupFactors, rank: int) -> float:
    """‖(W_g − Q P) L‖²_F in float64, computed from the factors themselves (not from σ), by row blocks."""
    device = factors.u.device
    root = factors.singular_values[:rank].sqrt()
    q = factors.u[:, :rank].to(root.dtype) * root
    p = root[:, None] * factors.vt_linv[:rank].to(root.dtype)
    total, first = 0.0, 0
    for weight in weights:
        for start in range(0, weight.shape[0], CHECK_ROWS):
            rows = weight.detach()[start:start + CHECK_ROWS].to(device=device, dtype=torch.float64)
            rows = rows - q[first + start:first + start + rows.shape[0]] @ p
            total += float(torch.linalg.vector_norm(factors.whitening.apply(rows)).square())
        first += weight.shape[0]
    return total


def predicted_loss(factors: GroupFactors, rank: int) -> float:
    """Σ_{i>k} σ_i²: the whitened truncation loss by Eckart–Young."""
    return float((factors.singular_values[rank:] ** 2).sum())
