"""The closed-form update and the reduced-rank fit, against float64 least squares on the token matrices."""

from __future__ import annotations

import pytest
import torch

from workbench.engine.compensation import (OutputError, output_error, reduced_rank_fit, solve_coefficients,
                                           update_coefficients)
from workbench.engine.factorize import whitened_svd


def _problem(seed: int, n: int = 400, d_in: int = 24, d_out: int = 16, k: int = 6, drift: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    x[:, 0] *= 30.0  # one dominant channel, as in real activations
    x_hat = x + drift * torch.randn(n, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    p = torch.randn(k, d_in, generator=g, dtype=torch.float64)
    q = torch.randn(d_out, k, generator=g, dtype=torch.float64)
    return x, x_hat, w, p, q


def _stats(x, x_hat):
    return x.mT @ x, x.mT @ x_hat, x_hat.mT @ x_hat


@pytest.mark.parametrize("seed", range(4))
def test_update_equals_least_squares_on_the_tokens(seed):
    x, x_hat, w, p, _ = _problem(seed)
    gram, cross, gram_hat = _stats(x, x_hat)
    result = update_coefficients(w, p, gram, cross, gram_hat, ridge=0.0)
    reference = torch.linalg.lstsq(x_hat @ p.mT, x @ w.mT).solution.mT  # Qᵀ = argmin ‖X̂Pᵀ·Qᵀ − XWᵀ‖
    assert torch.allclose(result.coef, reference, rtol=1e-8, atol=1e-10)


def test_ridge_equals_the_augmented_least_squares_problem():
    x, x_hat, w, p, _ = _problem(7)
    gram, cross, gram_hat = _stats(x, x_hat)
    result = update_coefficients(w, p, gram, cross, gram_hat, ridge=0.05)
    z = x_hat @ p.mT
    lam = 0.05 * float((p @ gram_hat @ p.mT).diagonal().mean())
    assert result.ridge == pytest.approx(lam)
    a = torch.cat([z, lam ** 0.5 * torch.eye(z.shape[1], dtype=z.dtype)])
    b = torch.cat([x @ w.mT, torch.zeros(z.shape[1], w.shape[0], dtype=z.dtype)])
    reference = torch.linalg.lstsq(a, b).solution.mT
    assert torch.allclose(result.coef, reference, rtol=1e-8, atol=1e-10)


def test_output_error_from_statistics_equals_the_definition():
    x, x_hat, w, p, q = _problem(3)
    direct = float(((x @ w.mT - x_hat @ p.mT @ q.mT) ** 2).sum())
    assert output_error(w, q, p, *_stats(x, x_hat)) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("ridge", [0.0, 1e-6, 1e-2, 10.0, 1e4])
@pytest.mark.parametrize("seed", range(3))
def test_the_objective_never_gets_worse(seed, ridge):
    x, x_hat, w, p, _ = _problem(seed, n=30)  # fewer tokens than inputs are wide: an ill-posed fit
    gram, cross, gram_hat = _stats(x, x_hat)
    # The whitened SVD's own Q (fitted to the dense inputs) is what the update starts from.
    start = update_coefficients(w, p, gram, gram, gram, ridge=0.0).coef
    result = update_coefficients(w, p, gram, cross, gram_hat, coef=start, ridge=ridge)
    assert result.objective_after <= result.objective_before
    measured = float(((x @ w.mT - x_hat @ p.mT @ result.coef.mT) ** 2).sum())
    assert measured == pytest.approx(result.objective_after, rel=1e-8)
    if not result.taken:
        assert torch.equal(result.coef, start)


def test_reduced_rank_fit_on_dense_inputs_is_the_whitened_svd():
    x, _, w, _, _ = _problem(5)
    gram = x.mT @ x
    q, p = reduced_rank_fit(w, gram, gram, rank=6, ridge=0.0)
    factors = whitened_svd([w], gram, keep=6)
    qs, p_ref = factors.factors(6, dtype=torch.float64)
    assert torch.allclose(q @ p, qs[0] @ p_ref, rtol=1e-7, atol=1e-9)


def test_reduced_rank_fit_beats_every_other_rank_k_matrix_tried():
    x, x_hat, w, p0, _ = _problem(11)
    gram, cross, gram_hat = _stats(x, x_hat)
    q, p = reduced_rank_fit(w, gram_hat, cross, rank=6, ridge=0.0)
    best = output_error(w, q, p, gram, cross, gram_hat)
    fixed_basis = update_coefficients(w, p0, gram, cross, gram_hat, ridge=0.0)
    assert best <= fixed_basis.objective_after
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        dq = 1e-3 * torch.randn(q.shape, generator=g, dtype=torch.float64)
        dp = 1e-3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        assert output_error(w, q + dq, p + dp, gram, cross, gram_hat) >= best * (1 - 1e-12)


def test_update_shrunk_toward_an_anchor_equals_the_augmented_least_squares_problem():
    x, x_hat, w, p, q0 = _problem(8, n=30)
    gram, cross, gram_hat = _stats(x, x_hat)
    result = update_coefficients(w, p, gram, cross, gram_hat, ridge=0.3, anchor=q0)
    z = x_hat @ p.mT
    lam = 0.3 * float((p @ gram_hat @ p.mT).diagonal().mean())
    a = torch.cat([z, lam ** 0.5 * torch.eye(z.shape[1], dtype=z.dtype)])
    b = torch.cat([x @ w.mT, lam ** 0.5 * q0.mT])  # ‖Z·Qᵀ − XWᵀ‖² + λ‖Q − Q₀‖²
    reference = torch.linalg.lstsq(a, b).solution.mT
    assert torch.allclose(result.coef, reference, rtol=1e-8, atol=1e-10)
    far = update_coefficients(w, p, gram, cross, gram_hat, ridge=1e12, anchor=q0)
    assert torch.allclose(far.coef, q0, rtol=0, atol=1e-6)  # a huge λ gives the anchor back


@pytest.mark.parametrize("ridge", [1e-3, 0.5])
def test_reduced_rank_fit_shrunk_toward_an_anchor_is_the_rank_k_regression_on_augmented_rows(ridge):
    x, x_hat, w, p0, q0 = _problem(9, n=40)
    gram, cross, gram_hat = _stats(x, x_hat)
    anchor = q0 @ p0
    q, p = reduced_rank_fit(w, gram_hat, cross, rank=6, ridge=ridge, anchor=anchor)
    # Reference by another route: rows √λ·I / √λ·M₀ᵀ appended, then reduced-rank regression the textbook
    # way — the full least-squares B, projected on the top-k right singular vectors of the fitted X̃·B.
    lam = ridge * float(gram_hat.diagonal().mean())
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    design = torch.cat([x_hat, lam ** 0.5 * eye])
    target = torch.cat([x @ w.mT, lam ** 0.5 * anchor.mT])
    full = torch.linalg.lstsq(design, target).solution  # in×out
    v = torch.linalg.svd(design @ full, full_matrices=False).Vh[:6].mT  # out×k
    reference = (full @ v @ v.mT).mT
    assert torch.allclose(q @ p, reference, rtol=1e-7, atol=1e-9)


def test_one_output_error_scores_many_fits_as_the_direct_traces_do():
    # The compensate stage builds one OutputError per statistics set and scores every candidate with it.
    x, x_hat, w, p, q = _problem(11)
    stats = _stats(x, x_hat)
    error = OutputError(w, *stats)
    g = torch.Generator().manual_seed(12)
    for _ in range(3):
        q_, p_ = q + torch.randn(q.shape, generator=g, dtype=q.dtype), p + torch.randn(p.shape, generator=g, dtype=p.dtype)
        direct = float(torch.linalg.matrix_norm(x @ w.mT - x_hat @ p_.mT @ q_.mT) ** 2)
        assert error(q_, p_) == pytest.approx(direct, rel=1e-10)


def test_fits_from_a_given_w_c_equal_the_fits_that_compute_it():
    x, x_hat, w, p, q = _problem(13)
    gram, cross, gram_hat = _stats(x, x_hat)
    pull = OutputError(w, gram, cross, gram_hat).pull
    for given, computed in zip(reduced_rank_fit(w, gram_hat, cross, 6, ridge=1e-3, anchor=q @ p, pull=pull),
                               reduced_rank_fit(w, gram_hat, cross, 6, ridge=1e-3, anchor=q @ p)):
        assert torch.allclose(given, computed, rtol=0, atol=0)
    coef, lam = solve_coefficients(pull, p, gram_hat, ridge=1e-3, anchor=q)
    reference = update_coefficients(w, p, gram, cross, gram_hat, ridge=1e-3, anchor=q)
    assert lam == reference.ridge and torch.equal(coef, reference.coef)
