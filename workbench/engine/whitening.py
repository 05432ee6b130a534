"""Whitening factors of a Gram matrix G = XᵀX: G = L Lᵀ, so ‖(W − Ŵ)Xᵀ‖_F = ‖(W − Ŵ)L‖_F.

Cholesky is the fast, exact route. G is often singular (dead channels, too few tokens), so when
Cholesky fails we fall back to the eigendecomposition G = R Λ Rᵀ, L = R Λ^{1/2}, with a
pseudo-inverse on the null space (SVD-LLM V2). The fallback is reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("cholesky", "eigen")


@dataclass
class Whitening:
    factor: torch.Tensor  # L, float64, in×in, with G ≈ L Lᵀ
    method: str  # "cholesky" or "eigen"
    triangular: bool  # L lower triangular (Cholesky) or R Λ^{1/2} (eigen)
    rank: int  # numerical rank of G that the factor keeps
    fallback_reason: str | None = None
    _pinv_half: torch.Tensor | None = None  # eigen route: Λ^{+1/2} Rᵀ

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None

    def right_inverse(self, m: torch.Tensor) -> torch.Tensor:
        """Return M L⁻¹ (M L⁺ on the eigen route) without forming an explicit inverse."""
        if self.triangular:
            # X L = M  ⇔  Lᵀ Xᵀ = Mᵀ, an upper-triangular solve.
            return torch.linalg.solve_triangular(self.factor.mT, m.mT, upper=True).mT
        return m @ self._pinv_half


def _eigen(gram: torch.Tensor, reason: str | None) -> Whitening:
    evals, evecs = torch.linalg.eigh(gram)
    # Eigenvalues below this are rounding noise of a PSD matrix, treated as the null space.
    tol = evals.abs().max().clamp_min(1e-300) * gram.shape[0] * torch.finfo(gram.dtype).eps
    keep = evals > tol
    sqrt = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inv_sqrt = torch.where(keep, 1.0 / sqrt.where(keep, torch.ones_like(sqrt)), torch.zeros_like(sqrt))
    factor = evecs * sqrt  # R Λ^{1/2}
    pinv_half = (evecs * inv_sqrt).mT  # Λ^{+1/2} Rᵀ
    return Whitening(factor, "eigen", False, int(keep.sum()), reason, pinv_half)


def whitening_factor(gram: torch.Tensor, method: str = "cholesky") -> Whitening:
    """Factor a symmetric PSD Gram matrix (float64) for whitening."""
    if method not in METHODS:
        raise ValueError(f"unknown whitening method {method!r}; allowed: {', '.join(METHODS)}")
    # Cholesky and eigh read the lower triangle only, so an upper triangle that drifted from exact
    # symmetry is ignored without a symmetrised copy: at a 7B model's down_proj that copy alone is
    # 0.97 GB on top of the Gram and its factor.
    gram = gram.to(torch.float64)
    if not torch.isfinite(gram).all():
        raise FloatingPointError("the Gram matrix contains NaN or Inf")
    if method == "eigen":
        return _eigen(gram, None)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return _eigen(gram, f"Cholesky failed at pivot {int(info)} (singular or indefinite Gram)")
    diag = factor.diagonal()
    # A Cholesky that "succeeds" with pivots at rounding level gives an L⁻¹ that is pure noise.
    if diag.min() <= diag.max() * 1e-7:
        return _eigen(gram, "Cholesky pivots at rounding level (ill-conditioned Gram)")
    return Whitening(factor, "cholesky", True, gram.shape[0])
