"""Closed-form error compensation: refit a low-rank layer to the dense model's outputs.

For one linear site, X (N×in) are its inputs in the dense model and X̂ its inputs in the compressed
model (earlier modules already replaced). The dense output X·Wᵀ is the target. With the basis P
(k×in) of the compressed module kept, the output factor Q (out×k) that best matches it solves

    min_Q ‖X·Wᵀ − X̂·Pᵀ·Qᵀ‖²_F   ⇒   Q = W·C·Pᵀ·(P·Ĝ·Pᵀ)⁻¹,   C = XᵀX̂,  Ĝ = X̂ᵀX̂

(SVD-LLM's update, here with the compressed inputs). Everything is computed from the three
float64 statistics G = XᵀX, C and Ĝ, never from the token matrices, so it runs after a layer walk
that accumulated them. A ridge λ·I, relative to the mean diagonal of P·Ĝ·Pᵀ, keeps the solve
well conditioned when few tokens meet a wide input; the objective is evaluated before and after,
and an update that does not lower it is not taken (the caller keeps the old factor).

With a basis shared by n layers each layer gets its own Q against the shared P: the statistics
are per layer, the solve is the same.

`reduced_rank_fit` is the joint closed form (P and Q both refit, rank k): with Ĝ = L̂L̂ᵀ the
unconstrained optimum is M* = W·C·Ĝ⁻¹ and the best rank-k fit is trunc_k(M*·L̂)·L̂⁻¹; with X̂ = X it
reduces to the whitened SVD itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UpdateResult:
    coef: torch.Tensor  # Q, out×k, float64
    ridge: float  # the absolute λ used
    objective_before: float  # ‖X·Wᵀ − X̂·Pᵀ·Q_oldᵀ‖², from the statistics
    objective_after: float
    taken: bool  # False: the update did not lower the objective and Q_old stands


class OutputError:
    """‖X·Wᵀ − X̂·Pᵀ·Qᵀ‖²_F for many (Q, P) against one set of statistics G, C, Ĝ (float64).

    Expanded as tr(W·G·Wᵀ) − 2·⟨W·C·Pᵀ, Q⟩ + ⟨Q·(P·Ĝ·Pᵀ), Q⟩: the first term and W·C do not depend on
    the factors and are computed once, so each evaluation costs k·in² + out·in·k, not the out·in²
    products of the direct traces (the compensate stage scores about ten candidate fits per site).
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, gram_hat: torch.Tensor):
        w = weight.double()
        self.constant = float(((w @ gram.double()) * w).sum())  # tr(W·G·Wᵀ)
        self.pull = w @ cross.double()  # W·C, out×in: also the right-hand side of both fits
        self.gram_hat = gram_hat.double()

    def __call__(self, coef: torch.Tensor, basis: torch.Tensor) -> float:
        q, p = coef.double(), basis.double()
        normal = p @ self.gram_hat @ p.mT  # k×k
        return self.constant - 2 * float(((self.pull @ p.mT) * q).sum()) + float(((q @ normal) * q).sum())


def output_error(weight: torch.Tensor, coef: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor,
                 cross: torch.Tensor, gram_hat: torch.Tensor) -> float:
    """‖X·Wᵀ − X̂·Pᵀ·Qᵀ‖²_F from G = XᵀX, C = XᵀX̂, Ĝ = X̂ᵀX̂ (float64), for one (Q, P)."""
    return OutputError(weight, gram, cross, gram_hat)(coef, basis)


def solve_coefficients(pull: torch.Tensor, basis: torch.Tensor, gram_hat: torch.Tensor, ridge: float = 1e-6,
                       anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Q = (W·C·Pᵀ + λ·Q₀)·(P·Ĝ·Pᵀ + λI)⁻¹ from `pull` = W·C; returns Q and the absolute λ."""
    p = basis.double()
    normal = p @ gram_hat.double() @ p.mT  # k×k
    lam = ridge * float(normal.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    normal = normal + lam * torch.eye(normal.shape[0], dtype=normal.dtype, device=normal.device)
    rhs = pull.double() @ p.mT  # out×k
    if anchor is not None:
        rhs = rhs + lam * anchor.double()
    factor, info = torch.linalg.cholesky_ex(normal)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.mT, factor).mT, lam
    # singular even with the ridge (an all-zero input): least squares in the row space
    return torch.linalg.lstsq(normal, rhs.mT).solution.mT, lam


def update_coefficients(weight: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                        gram_hat: torch.Tensor, coef: torch.Tensor | None = None,
                        ridge: float = 1e-6, anchor: torch.Tensor | None = None) -> UpdateResult:
    """Q = (W·C·Pᵀ + λ·Q₀)·(P·Ĝ·Pᵀ + λI)⁻¹ with λ = `ridge`·mean(diag(P·Ĝ·Pᵀ)); float64 throughout.

    Q₀ = `anchor` (default 0: the plain ridge) is what a large λ shrinks toward; with Q₀ the current
    factor, λ → ∞ gives it back. `coef` is the current Q: the update is kept only when it lowers the
    output error.
    """
    error = OutputError(weight, gram, cross, gram_hat)
    p = basis.double()
    new, lam = solve_coefficients(error.pull, p, gram_hat, ridge, anchor)
    after = error(new, p)
    if coef is None:
        return UpdateResult(new, lam, float("nan"), after, True)
    before = error(coef, p)
    taken = after < before
    return UpdateResult(new if taken else coef.double(), lam, before, after if taken else before, taken)


def reduced_rank_fit(weight: torch.Tensor, gram_hat: torch.Tensor, cross: torch.Tensor, rank: int,
                     ridge: float = 1e-6, anchor: torch.Tensor | None = None,
                     pull: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` M = Q·P for min ‖X·Wᵀ − X̂·Mᵀ‖² + λ‖M − M₀‖²: returns (Q, P), out×k and k×in.

    λ = `ridge`·mean(diag Ĝ); M₀ = `anchor` (out×in, default 0). The penalised objective equals
    ‖(M − M*)·L̂‖² + const with L̂L̂ᵀ = Ĝ + λI and M* = (W·C + λM₀)(Ĝ + λI)⁻¹, so its rank-k optimum is
    still trunc_k(M*·L̂)·L̂⁻¹ — exact, not an approximation. float64. `pull` = W·C when already at hand.
    """
    w, g = weight.double(), gram_hat.double()
    lam = ridge * float(g.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    g = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    lower = torch.linalg.cholesky(g)  # Ĝ + λI = L̂ L̂ᵀ
    pull = w @ cross.double() if pull is None else pull.double()
    if anchor is not None:
        pull = pull + lam * anchor.double()
    # M*·L̂ = (W·C + λM₀)·(Ĝ + λI)⁻¹·L̂ = (W·C + λM₀)·L̂⁻ᵀ: one triangular solve, no inverse.
    target = torch.linalg.solve_triangular(lower, pull.mT, upper=False).mT
    u, s, vt = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    q = u[:, :rank] * root
    # P = Σ^{1/2}·Vᵀ·L̂⁻¹  ⇔  P·L̂ = Σ^{1/2}·Vᵀ, solved as L̂ᵀ·Pᵀ = (Σ^{1/2}·Vᵀ)ᵀ.
    p = torch.linalg.solve_triangular(lower.mT, (root[:, None] * vt[:rank]).mT, upper=True).mT
    return q, p
