"""Grouped SVD of whitened weights: one shared input basis P_g, one output factor Q⁽ˡ⁾ per layer.

For a group of n layers of one matrix type, W_g = [W⁽¹⁾; …; W⁽ⁿ⁾] (n·out × in) is whitened with the
group's summed Gram, A = W_g L = U Σ Vᵀ, and rank k keeps Q = U_k Σ_k^{1/2}, P = Σ_k^{1/2} V_kᵀ L⁻¹.
The whitened loss at rank k is exactly Σ_{i>k} σ_i² (Eckart–Young), the engine's built-in check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from workbench.engine.whitening import Whitening, symmetric_eigh, whitening_factor


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


# Rows (or columns) of W_g per block of the CPU route's products: its temporaries are a block of
# W_g in float64, never the whitened matrix A = W_g L (n·out × in float64: 0.34 GiB at a 7B down_proj).
SVD_ROWS = 1024


def _row_blocks(weights: list[torch.Tensor], device: torch.device):
    """(first row in W_g, those rows of W_g in float64), SVD_ROWS rows at a time, layer after layer."""
    first = 0
    for weight in weights:
        for start in range(0, weight.shape[0], SVD_ROWS):
            yield first + start, weight.detach()[start:start + SVD_ROWS].to(device=device, dtype=torch.float64)
        first += weight.shape[0]


def _top_eigenvectors(small: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(all σ descending, the `keep` leading eigenvectors) of A's smaller Gram, decomposed in its own memory."""
    evals, evecs = symmetric_eigh(small)
    s = evals.flip(0).clamp_min(0).sqrt()
    keep = min(keep, s.numel())
    return s, evecs[:, evecs.shape[1] - keep:].flip(1)  # a copy of `keep` columns only, not of all of them


# Components with σ at or below this fraction of σ₁ are rounding noise: they carry no signal, and
# their vectors are zeroed rather than amplified by 1/σ.
LIVE_FROM = 1e-10


def _live_inverse(s: torch.Tensor, keep: int) -> torch.Tensor:
    """1/σ of the first `keep` components, 0 for those at rounding level (LIVE_FROM)."""
    live = s[:keep] > s[0] * LIVE_FROM
    return torch.where(live, 1.0 / s[:keep].where(live, torch.ones_like(s[:keep])), torch.zeros_like(s[:keep]))


def _inverse_sigma_ut_w(top: torch.Tensor, w: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Σ_k⁻¹ U_kᵀ W (float64) with `inv` = `_live_inverse`, W read a block of SVD_ROWS columns at a time."""
    out = torch.empty(top.shape[1], w.shape[1], dtype=torch.float64, device=top.device)
    for start in range(0, w.shape[1], SVD_ROWS):
        out[:, start:start + SVD_ROWS] = top.mT @ w[:, start:start + SVD_ROWS].to(torch.float64)
    return out.mul_(inv[:, None])


def _svd_by_eigh(weights: list[torch.Tensor], white: Whitening, keep: int) -> tuple[torch.Tensor, ...]:
    """Thin SVD of A = W_g L from the eigendecomposition of its smaller Gram (float64), A never formed.

    Three to four times faster than LAPACK's SVD on a CPU. Squaring costs relative accuracy only
    for σ_i below ~1e-8·σ_1, far past any rank worth keeping; their σ_i² (all the loss needs) stay
    accurate to float64 rounding of the total energy. A's Gram is summed from blocks of A's columns
    (wide A) or rows (tall A), and the vectors are read back from W_g: at a 7B model's widest
    matrices this holds under half of what forming A and its SVD held. Returns (σ, U_keep, V_keepᵀ L⁻¹).
    """
    device = white.factor.device
    rows, width = sum(w.shape[0] for w in weights), white.factor.shape[0]
    wide = rows <= width
    small = torch.zeros(min(rows, width), min(rows, width), dtype=torch.float64, device=device)
    if wide:  # A Aᵀ, a block of A's columns at a time; W_g read in its own dtype
        stacked = weights[0].detach().to(device) if len(weights) == 1 else torch.cat(
            [w.detach().to(device) for w in weights])
        for start in range(0, width, SVD_ROWS):
            block = white.columns(stacked, start, min(start + SVD_ROWS, width), SVD_ROWS)
            small.addmm_(block, block.mT)
    else:  # Aᵀ A, a block of A's rows at a time
        for _, block in _row_blocks(weights, device):
            block = white.apply(block)
            small.addmm_(block.mT, block)
    del block
    s, top = _top_eigenvectors(small, keep)
    del small
    keep = top.shape[1]
    inv = _live_inverse(s, keep)
    if wide:  # eigenvectors are U; V_kᵀ L⁻¹ = Σ_k⁻¹ U_kᵀ W_g L L⁻¹: no solve, L L⁻¹ = I (L L⁺ a projection)
        return s, top, white.project_(_inverse_sigma_ut_w(top, stacked, inv))
    # eigenvectors are V; U_k = A V_k Σ_k⁻¹ = W_g (L V_k Σ_k⁻¹), a block of W_g's rows at a time
    lv = white.left(top).mul_(inv)
    u = torch.empty(rows, keep, dtype=torch.float64, device=device)
    for first, block in _row_blocks(weights, device):
        u[first:first + block.shape[0]] = block @ lv
    del lv
    return s, u, white.right_inverse_(top.mT)  # V_kᵀ L⁻¹ in V_k's memory


def _svd_by_lapack(weights: list[torch.Tensor], white: Whitening, keep: int) -> tuple[torch.Tensor, ...]:
    """The SVD of A itself: on a GPU it is fast and exact enough, and the eigh route's blocks do not pay."""
    device = white.factor.device
    stacked = torch.cat([w.detach().to(device=device, dtype=torch.float64) for w in weights], dim=0)
    a = white.apply(stacked)
    del stacked  # n·out × in float64: not needed past this point, freed before the SVD's own buffers
    u, s, vt = torch.linalg.svd(a, full_matrices=False)
    del a
    keep = min(keep, s.numel())
    return s, u[:, :keep], white.right_inverse_(vt[:keep].clone())  # its own memory: V_rᵀ L⁻¹ in place


def whitened_svd(weights: list[torch.Tensor], gram: torch.Tensor | None, keep: int, method: str = "cholesky",
                 overwrite: bool = False, white: Whitening | None = None) -> GroupFactors:
    """SVD of [W⁽¹⁾; …; W⁽ⁿ⁾]·L, keeping the first `keep` components' vectors (all singular values).

    `overwrite`: `gram` is not read again by the caller and may become L (`whitening_factor`).
    `white`: the Gram's whitening, already factored (then `gram` is not read).
    """
    white = white or whitening_factor(gram, method, overwrite)
    s, u, vt_linv = (_svd_by_lapack if white.factor.is_cuda else _svd_by_eigh)(weights, white, keep)
    return GroupFactors(s, u.contiguous(), vt_linv, weights[0].shape[0], white)


# The "whitening" a group factored from its output's Gram reports (`output_svd`): no factor L is formed.
OUTPUT_METHOD = "output-gram"


def output_svd(weight: torch.Tensor, gram: torch.Tensor, keep: int) -> GroupFactors:
    """The whitened SVD of one layer's W from C = YᵀY = W XᵀX Wᵀ, the Gram of its output (float64).

    C = A Aᵀ for A = W L whatever the whitening L of XᵀX, so its eigenvectors are A's left singular
    vectors and its eigenvalues the σ²; V_kᵀL⁻¹ = Σ_k⁻¹U_kᵀW (as on the wide route of
    `_svd_by_eigh`), and Ŵ = U_k U_kᵀ W. No Cholesky, no L: a singular XᵀX needs no fallback. `gram`
    is left as it is (the loss check reads it: `measured_output_loss`).
    """
    s, top = _top_eigenvectors(gram.to(torch.float64).clone(), keep)
    w = weight.detach().to(device=gram.device)
    vt_linv = _inverse_sigma_ut_w(top, w, _live_inverse(s, top.shape[1]))
    white = Whitening(gram.new_empty(0), OUTPUT_METHOD, False, int((s > s[0] * LIVE_FROM).sum()))
    return GroupFactors(s, top.contiguous(), vt_linv, w.shape[0], white)


def measured_output_loss(factors: GroupFactors, gram: torch.Tensor, rank: int) -> float:
    """‖(W − QP)L‖²_F for a group factored from its output's Gram C, from its factors' U_k:
    QP = U_k U_kᵀ W, so the loss is tr((I − Π) C (I − Π)) with Π = U_k U_kᵀ, expanded as
    tr C − 2 tr(U_kᵀCU_k) + tr(U_kᵀCU_k · U_kᵀU_k) (U_k not assumed orthonormal: a wrong one shows)."""
    u = factors.u[:, :rank].to(torch.float64)
    c = gram.to(torch.float64)
    projected = u.mT @ (c @ u)
    return float(c.diagonal().sum() - 2 * projected.diagonal().sum() + (projected * (u.mT @ u)).sum())


# Rows of W_g per block of the loss check: its temporaries are a few blocks of rows × in (float64),
# not several copies of the whole n·out × in matrix (1.4 GB at a 7B down_proj, the factoring's peak).
CHECK_ROWS = 1024


def measured_loss(weights: list[torch.Tensor], factors: GroupFactors, rank: int) -> float:
    """‖(W_g − Q P) L‖²_F in float64, computed from the factors themselves (not from σ), by row blocks."""
    device = factors.u.device
    # Ŵ = (U_k Σ_k) V_kᵀL⁻¹ or U_k (Σ_k V_kᵀL⁻¹): Σ_k goes into the smaller factor, the other is read as it is.
    s = factors.singular_values[:rank]
    q, p = factors.u[:, :rank].to(s.dtype), factors.vt_linv[:rank].to(s.dtype)
    if q.shape[0] <= p.shape[1]:
        q = q * s
    else:
        p = s[:, None] * p
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
