"""The whitened truncation loss identity, checked against float64 references."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import factorize
from workbench.engine.factorize import measured_loss, predicted_loss, whitened_svd
from workbench.engine.whitening import whitening_factor


def _data(out=24, inp=16, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g, dtype=torch.float64)
    return w, x


def _output_loss(w, x, factors, k):
    """‖(W − Ŵ)Xᵀ‖²_F straight from the definition, independent of L."""
    root = factors.singular_values[:k].sqrt()
    w_hat = (factors.u[:, :k] * root) @ (root[:, None] * factors.vt_linv[:k])
    return float((((w - w_hat) @ x.T) ** 2).sum())


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
@pytest.mark.parametrize("k", [1, 3, 8, 15, 16])
def test_loss_identity_at_several_ranks(method, k):
    w, x = _data()
    f = whitened_svd([w], x.T @ x, keep=16, method=method)
    predicted = predicted_loss(f, k)
    assert measured_loss([w], f, k) == pytest.approx(predicted, rel=1e-9, abs=1e-9)
    assert _output_loss(w, x, f, k) == pytest.approx(predicted, rel=1e-9, abs=1e-9)


def test_truncation_is_optimal_against_plain_svd():
    """Eckart–Young in the whitened norm: whitened SVD beats plain SVD on the output loss."""
    w, x = _data(seed=3)
    f = whitened_svd([w], x.T @ x, keep=16)
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    k = 6
    plain = (u[:, :k] * s[:k]) @ vt[:k]
    plain_loss = float((((w - plain) @ x.T) ** 2).sum())
    assert _output_loss(w, x, f, k) < plain_loss


def test_group_shares_one_basis_and_matches_closed_form():
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(8, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(50, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    gram = sum(x.T @ x for x in xs)
    f = whitened_svd(ws, gram, keep=12)
    stacked = torch.cat(ws)
    l = torch.linalg.cholesky(gram)
    expected = torch.linalg.svdvals(stacked @ l)
    assert torch.allclose(f.singular_values, expected, rtol=1e-10)
    qs, p = f.factors(12, dtype=torch.float64)
    assert len(qs) == 3 and p.shape == (12, 12)
    for w, q in zip(ws, qs):  # full rank reproduces every layer exactly
        assert torch.allclose(q @ p, w, atol=1e-9)
    for k in (2, 5, 9):
        assert measured_loss(ws, f, k) == pytest.approx(predicted_loss(f, k), rel=1e-9)


def test_loss_check_by_row_blocks_equals_the_whole_matrix_at_once(monkeypatch):
    # Blocks that split layers unevenly (3 rows per block, 8 rows per layer) must still pair each
    # weight row with its own row of Q.
    g = torch.Generator().manual_seed(6)
    ws = [torch.randn(8, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(60, 12, generator=g, dtype=torch.float64)
    f = whitened_svd(ws, x.T @ x, keep=12)
    monkeypatch.setattr(factorize, "CHECK_ROWS", 3)
    for k in (2, 7):
        qs, p = f.factors(k, dtype=torch.float64)
        whole = float(((torch.cat(ws) - torch.cat(qs) @ p) @ f.whitening.factor).square().sum())
        assert measured_loss(ws, f, k) == pytest.approx(whole, rel=1e-12)


def test_singular_gram_falls_back_and_reports():
    w, x = _data(tokens=5)  # 5 tokens in 16 dimensions: rank-deficient Gram
    white = whitening_factor(x.T @ x, "cholesky")
    assert white.method == "eigen" and white.fell_back and white.rank == 5
    f = whitened_svd([w], x.T @ x, keep=16)
    for k in (1, 3, 5):
        assert measured_loss([w], f, k) == pytest.approx(predicted_loss(f, k), rel=1e-8, abs=1e-8)
    assert float(f.singular_values[5:].abs().max()) < 1e-8 * float(f.singular_values[0])


def test_dead_input_channel_is_handled():
    w, x = _data()
    x[:, 3] = 0.0
    f = whitened_svd([w], x.T @ x, keep=16)
    assert f.whitening.fell_back
    assert torch.isfinite(f.vt_linv).all()
    assert _output_loss(w, x, f, 4) == pytest.approx(predicted_loss(f, 4), rel=1e-8)


def test_nan_gram_is_refused():
    gram = torch.eye(4, dtype=torch.float64)
    gram[1, 1] = float("nan")
    with pytest.raises(FloatingPointError):
        whitening_factor(gram)


@pytest.mark.parametrize("width,panel,products", [(16, 256, 1), (1100, 256, 5), (1100, 300, 4), (1100, 512, 3)])
def test_gram_in_row_panels_equals_plain_float64_product(monkeypatch, width, panel, products):
    from workbench.engine import calibration
    from workbench.engine.calibration import add_gram, symmetrize, upper_products

    monkeypatch.setattr(calibration, "PANEL", panel)
    monkeypatch.setattr(calibration, "MAX_COLUMNS", 700)  # and the first panels' products in two pieces
    assert len({rows.start for _, rows, _ in upper_products(width)}) == products

    g = torch.Generator().manual_seed(width)
    gram = torch.zeros(width, width, dtype=torch.float64)
    batches = [torch.randn(64, width, generator=g, dtype=torch.float64) for _ in range(3)]
    with torch.inference_mode():  # as in calibration
        gram = gram.clone()
        for x in batches:
            add_gram(gram, x)
    stacked = torch.cat(batches)
    symmetrize(gram)
    assert torch.equal(gram, gram.mT)
    assert torch.allclose(gram, stacked.T @ stacked, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
def test_compact_drops_the_whitening_factor_but_keeps_the_factors(method):
    """What waits for allocation is U and VᵀL⁻¹ only, not the in×in float64 L."""
    w, x = _data()
    f = whitened_svd([w], x.T @ x, keep=16, method=method)
    qs, p = f.factors(4, dtype=torch.float64)
    f.compact(torch.float32)
    assert f.whitening.factor.numel() == 0 and f.whitening._root is None and f.whitening._inverse_root is None
    assert (f.whitening.method, f.u.dtype, f.vt_linv.dtype) == (method, torch.float32, torch.float32)
    qs32, p32 = f.factors(4, dtype=torch.float64)
    assert torch.allclose(qs32[0] @ p32, qs[0] @ p, rtol=1e-5, atol=1e-6 * float((qs[0] @ p).abs().max()))


def test_factoring_a_shared_group_leaves_each_layers_gram_as_it_was():
    # One layer's Gram is factored in place of a copy; a shared group's are summed into a new matrix,
    # never into the first layer's (a checkpoint or a resumed run reads them again).
    from torch import nn

    from workbench.api import Site
    from workbench.engine.compress import _factor_group
    from workbench.engine.grouping import GroupPlan

    g = torch.Generator().manual_seed(8)
    layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(12, 8, bias=False)}) for _ in range(2))
    grams = {}
    for i in range(2):
        x = torch.randn(40, 12, generator=g, dtype=torch.float64)
        grams[("in", i)] = x.T @ x
    before = {key: gram.clone() for key, gram in grams.items()}
    plan = GroupPlan("proj@0-1", Site("proj", "proj", "in"), (0, 1), 12, 8)
    shared = _factor_group(layers, plan, grams, "cholesky", torch.device("cpu"), full=True)
    assert all(torch.equal(grams[key], before[key]) for key in grams)
    expected = torch.linalg.svdvals(torch.cat([layers[i]["proj"].weight.double() for i in range(2)])
                                    @ torch.linalg.cholesky(before[("in", 0)] + before[("in", 1)]))
    assert torch.allclose(shared.singular_values, expected, rtol=1e-10)


# ------------------------------------------------------------------ factoring a spent Gram in place


def _wide_gram(n, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(0, 3, n, dtype=torch.float64)
    gram = x.T @ x
    return (gram + gram.T) / 2  # exactly symmetric, as the walk's Grams are (`symmetrize`)


@pytest.mark.parametrize("n,block", [(37, 8), (40, 8), (64, 64), (50, 100)])
def test_in_place_cholesky_equals_lapack_and_leaves_the_upper_blocks_alone(n, block):
    from workbench.engine.whitening import _blocks, _cholesky_in_place

    gram = _wide_gram(n, 3 * n)
    work = gram.clone()
    assert _cholesky_in_place(work, block) == 0
    reference = torch.linalg.cholesky(gram)
    assert torch.allclose(work.tril(), reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max()))
    spans = _blocks(n, block)
    for a, (r0, r1) in enumerate(spans):
        for c0, c1 in spans[a + 1:]:
            assert torch.equal(work[r0:r1, c0:c1], gram[r0:r1, c0:c1])


def _overwriting(monkeypatch):
    from workbench.engine import whitening

    monkeypatch.setattr(whitening, "IN_PLACE_FROM", 16)
    monkeypatch.setattr(whitening, "BLOCK", 8)


def test_an_overwritable_gram_becomes_its_own_factor(monkeypatch):
    _overwriting(monkeypatch)
    gram = _wide_gram(30, 90)
    reference = torch.linalg.cholesky(gram)
    work = gram.clone()
    white = whitening_factor(work, "cholesky", overwrite=True)
    assert white.in_place and not white.fell_back and white.method == "cholesky"
    assert white.factor.data_ptr() == work.data_ptr()  # no second in×in matrix
    assert torch.allclose(white.factor, reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max()))
    kept = whitening_factor(gram.clone(), "cholesky")  # without overwrite: LAPACK on a copy, as before
    assert not kept.in_place and torch.equal(kept.factor, reference)


@pytest.mark.parametrize("case", ["singular", "rounding-level pivots"])
def test_a_failed_in_place_cholesky_gives_the_gram_back_exactly_for_the_eigen_route(monkeypatch, case):
    _overwriting(monkeypatch)
    if case == "singular":  # 12 tokens in 30 dimensions: a pivot fails
        gram = _wide_gram(30, 12)
    else:  # positive definite, but a pivot ~1e-9 of the largest
        gram = _wide_gram(30, 90)
        gram[20, :] *= 1e-9
        gram[:, 20] *= 1e-9
    from workbench.engine import whitening

    seen = []
    real = whitening._eigen
    monkeypatch.setattr(whitening, "_eigen", lambda g, reason, overwrite=False: seen.append(g.clone()) or real(g, reason, overwrite))
    work = gram.clone()
    white = whitening_factor(work, "cholesky", overwrite=True)
    assert white.method == "eigen" and white.fell_back and white.in_place
    assert torch.equal(seen[0], gram)  # restored bit for bit before the eigen route read it
    assert white.factor.data_ptr() == work.data_ptr()  # and the eigenvectors took its memory
    expected = whitening_factor(gram.clone(), "eigen")
    assert white.rank == expected.rank and torch.equal(white.factor, expected.factor)
    assert torch.equal(white._root, expected._root) and torch.equal(white._inverse_root, expected._inverse_root)


def _one_layer_group(width=24, out=20, tokens=80, seed=9):
    from torch import nn

    from workbench.api import Site
    from workbench.engine.grouping import GroupPlan
    from workbench.engine.walk import LayerStatistics

    g = torch.Generator().manual_seed(seed)
    layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(width, out, bias=False)})])
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64)
    plan = GroupPlan("proj@0", Site("proj", "proj", "in"), (0,), width, out)
    return layers, plan, LayerStatistics({("in", 0): x.T @ x})


def test_the_last_reader_of_a_gram_factors_it_in_place_and_frees_it(monkeypatch):
    from workbench.engine.compress import group_factorer
    from workbench.events import EventBus

    _overwriting(monkeypatch)
    factor = group_factorer("cholesky", torch.device("cpu"), EventBus(), full_factors=True)
    layers, plan, stats = _one_layer_group()
    gram = stats[("in", 0)].clone()
    kept, _ = factor(layers, plan, stats)  # nobody said the Gram is spent: left as it was
    assert torch.equal(stats[("in", 0)], gram)
    stats.last_reader = {plan.key: [("in", 0)]}
    spent, entry = factor(layers, plan, stats)
    assert ("in", 0) not in stats and entry["method"] == "cholesky"
    assert torch.allclose(spent.singular_values, kept.singular_values, rtol=1e-10)
    for k in (3, 12):
        q, p = spent.factors(k, torch.float64)
        q0, p0 = kept.factors(k, torch.float64)
        assert torch.allclose(q[0] @ p, q0[0] @ p0, rtol=1e-9, atol=1e-10)


def test_a_loss_check_failure_after_an_in_place_cholesky_takes_the_eigen_route_from_l_lt(monkeypatch):
    from workbench.engine import compress

    _overwriting(monkeypatch)
    layers, plan, stats = _one_layer_group()
    gram = stats[("in", 0)].clone()
    calls = []

    def fails_once(error, tolerance):
        calls.append(error)
        return len(calls) == 1

    monkeypatch.setattr(compress, "loss_check_failed", fails_once)
    f = compress._factor_group(layers, plan, stats, "cholesky", torch.device("cpu"), full=True, spent=[("in", 0)])
    assert f.whitening.method == "eigen" and "loss check failed" in f.whitening.fallback_reason and len(calls) == 2
    reference = whitened_svd([layers[0]["proj"].weight], gram, keep=20, method="eigen")
    assert torch.allclose(f.singular_values, reference.singular_values, rtol=1e-9)


def test_a_loss_check_failure_with_a_reused_whitening_takes_the_eigen_route_from_the_grams(monkeypatch):
    from workbench.engine import compress

    layers, plan, stats = _one_layer_group()
    gram = stats[("in", 0)].clone()
    reused = whitening_factor(gram.clone(), "cholesky")  # what the first of q/k/v left for the others
    calls = []
    monkeypatch.setattr(compress, "loss_check_failed", lambda error, tolerance: calls.append(error) or len(calls) == 1)
    f = compress._factor_group(layers, plan, stats, "cholesky", torch.device("cpu"), full=True, white=reused)
    assert f.whitening.method == "eigen" and "loss check failed" in f.whitening.fallback_reason
    assert torch.equal(stats[("in", 0)], gram)  # read, not overwritten: another group may still need it
    reference = whitened_svd([layers[0]["proj"].weight], gram, keep=20, method="eigen")
    assert torch.allclose(f.singular_values, reference.singular_values, rtol=1e-9)


def test_last_readers_name_only_statistics_no_later_group_reads():
    from workbench.api import Site
    from workbench.engine.grouping import GroupPlan
    from workbench.engine.walk import _last_readers

    def plan(name, group, layers):
        return GroupPlan(f"{name}@{layers[0]}", Site(name, name, group), tuple(layers), 8, 8)

    q, k, v = plan("q", "attn", [3]), plan("k", "attn", [3]), plan("v", "attn", [3])
    down = plan("down", "mlp", [3])
    shared_up = plan("up", "up_in", [2, 3])  # its layer-2 statistic is read by no one after it
    pending_gate = plan("gate", "up_in", [3, 4])  # still pending after layer 3: reads ("up_in", 3)
    ready = [q, k, v, down, shared_up]
    readers = _last_readers(ready, ready + [pending_gate])
    assert readers == {"v@3": [("attn", 3)], "down@3": [("mlp", 3)], "up@2": [("up_in", 2)]}


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
def test_right_inverse_in_place_by_row_blocks_equals_the_whole_solve(method):
    gram = _wide_gram(20, 12 if method == "eigen" else 60)  # the eigen route with a null space
    white = whitening_factor(gram, method)
    m = torch.randn(9, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = white.right_inverse(m)
    work = m.clone()
    out = white.right_inverse_(work, rows=4)  # blocks of 4, 4 and 1 rows
    assert out.data_ptr() == work.data_ptr()
    assert torch.allclose(out, whole, rtol=1e-12, atol=1e-12 * float(whole.abs().max()))


# ------------------------------------------------------------------ the SVD routes against LAPACK's SVD of A


def _reference(ws, gram, method, k):
    """σ and W_g's rank-k approximation U_k Σ_k V_kᵀ L⁺ from LAPACK's SVD of the whole A = W_g L, L and L⁺ formed."""
    if method == "cholesky":
        l = torch.linalg.cholesky(gram)
        l_pinv = torch.linalg.inv(l)
    else:
        evals, r = torch.linalg.eigh(gram)
        live = evals > evals.max() * gram.shape[0] * torch.finfo(torch.float64).eps
        root = torch.where(live, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
        l, l_pinv = r * root, (r * torch.where(live, 1 / root.where(live, torch.ones_like(root)), 0 * root)).T
    u, s, vt = torch.linalg.svd(torch.cat(ws) @ l, full_matrices=False)
    return s, (u[:, :k] * s[:k]) @ vt[:k] @ l_pinv


@pytest.mark.parametrize("route", ["_svd_by_eigh", "_svd_by_lapack"])
@pytest.mark.parametrize("block", [3, 1024])  # A's Gram and the vectors by blocks of 3 rows/columns, or at once
@pytest.mark.parametrize("method,tokens", [("cholesky", 200), ("eigen", 200), ("eigen", 9)])  # 9: singular G
@pytest.mark.parametrize("layers,out,width", [(1, 8, 20), (2, 6, 20), (1, 30, 12), (3, 8, 12)])  # wide and tall
def test_svd_routes_equal_lapacks_svd_of_the_whole_whitened_matrix(monkeypatch, route, block, method, tokens,
                                                                   layers, out, width):
    from workbench.engine.whitening import whitening_factor

    monkeypatch.setattr(factorize, "SVD_ROWS", block)
    g = torch.Generator().manual_seed(layers * out * width + tokens)
    ws = [torch.randn(out, width, generator=g, dtype=torch.float64) for _ in range(layers)]
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64) * torch.logspace(0, 2, width, dtype=torch.float64)
    gram = x.T @ x
    keep = min(width, layers * out)
    s, u, vt_linv = getattr(factorize, route)(ws, whitening_factor(gram, method), keep)
    s_ref, _ = _reference(ws, gram, method, keep)
    # σ from A's Gram: relative accuracy to 1e-9, absolute only ~√ε·σ_1 at rounding level (squaring)
    assert torch.allclose(s, s_ref, rtol=1e-9, atol=1e-7 * float(s_ref[0]))
    scale = float(torch.cat(ws).abs().max())
    for k in {1, keep // 2, min(keep, tokens)}:
        w_hat = (u[:, :k] * s[:k]) @ vt_linv[:k]
        assert torch.allclose(w_hat, _reference(ws, gram, method, k)[1], rtol=1e-8, atol=1e-8 * scale)


@pytest.mark.parametrize("scipy_from", [16, 2048])  # SciPy's LAPACK route at this width, or torch's
@pytest.mark.parametrize("inference", [False, True])  # the walk's Grams are inference tensors
def test_symmetric_eigh_equals_torch_and_puts_the_vectors_in_the_matrix(monkeypatch, inference, scipy_from):
    from workbench.engine import whitening
    from workbench.engine.whitening import symmetric_eigh

    monkeypatch.setattr(whitening, "EIGH_IN_PLACE_FROM", scipy_from)

    gram = _wide_gram(40, 25)  # singular: 15 zero eigenvalues
    expected_values, expected_vectors = torch.linalg.eigh(gram)
    with torch.inference_mode(inference):
        work = gram.clone()
    values, vectors = symmetric_eigh(work)
    assert vectors.data_ptr() == work.data_ptr()  # no second 40 × 40 matrix
    scale = float(expected_values.abs().max())
    assert torch.allclose(values, expected_values, rtol=0, atol=1e-12 * scale)
    top = slice(15, 40)  # eigenvectors of distinct nonzero eigenvalues agree up to sign
    dots = (vectors[:, top] * expected_vectors[:, top]).sum(0).abs()
    assert torch.allclose(dots, torch.ones_like(dots), atol=1e-9)
    assert torch.allclose((vectors * values) @ vectors.mT, gram, atol=1e-10 * scale)


@pytest.mark.parametrize("n,block", [(16, 256), (600, 256), (600, 7)])
def test_products_with_a_lower_triangular_factor_skip_its_zero_blocks_exactly(monkeypatch, n, block):
    """M·L by column blocks, each reading L's rows from its first on, equals the whole product."""
    from workbench.engine import whitening
    from workbench.engine.whitening import times_lower

    monkeypatch.setattr(whitening, "LOWER_BLOCK", block)
    g = torch.Generator().manual_seed(n)
    lower = torch.randn(n, n, generator=g, dtype=torch.float64).tril_()
    m = torch.randn(2, 33, n, generator=g, dtype=torch.float64)
    assert torch.allclose(times_lower(m, lower), m @ lower, rtol=1e-12, atol=1e-12 * n)
