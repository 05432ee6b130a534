"""Whitening factors of a Gram matrix G = XᵀX: G = L Lᵀ, so ‖(W − Ŵ)Xᵀ‖_F = ‖(W − Ŵ)L‖_F.

Cholesky is the fast, exact route. G is often singular (dead channels, too few tokens), so when
Cholesky fails we fall back to the eigendecomposition G = R Λ Rᵀ, L = R Λ^{1/2}, with a
pseudo-inverse on the null space (SVD-LLM V2). The fallback is reported, never silent.

A Gram that nothing reads after its factoring can be factored in place (`overwrite`): L takes G's
memory instead of a second in×in float64 matrix (0.9 GiB at a 7B model's down_proj, 6 GiB at a
70B one's), by a blocked Cholesky that leaves G recoverable until it succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.engine.numerics import all_finite

METHODS = ("cholesky", "eigen")


@dataclass
class Whitening:
    factor: torch.Tensor  # Cholesky: L (lower triangular), G = L Lᵀ; eigen: R, with L = R Λ^{1/2}
    method: str  # "cholesky" or "eigen"
    triangular: bool  # L lower triangular (Cholesky) or R Λ^{1/2} (eigen)
    rank: int  # numerical rank of G that the factor keeps
    fallback_reason: str | None = None
    # eigen route: Λ^{1/2} and Λ^{+1/2} (zero on the null space), kept as vectors: L and L⁺ are applied
    # as R·diag, never formed (each would be another in×in matrix)
    _root: torch.Tensor | None = None
    _inverse_root: torch.Tensor | None = None
    in_place: bool = False  # the factor took the Gram's memory: G is gone (L·Lᵀ gives it back to rounding)

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """Return M L."""
        if self.triangular:
            return times_lower(m, self.factor)
        return (m @ self.factor).mul_(self._root)

    def right_inverse(self, m: torch.Tensor) -> torch.Tensor:
        """Return M L⁻¹ (M L⁺ = M Λ^{+1/2} Rᵀ on the eigen route) without forming an explicit inverse."""
        if self.triangular:
            # X L = M  ⇔  Lᵀ Xᵀ = Mᵀ, an upper-triangular solve.
            return torch.linalg.solve_triangular(self.factor.mT, m.mT, upper=True).mT
        return (m * self._inverse_root) @ self.factor.mT

    def left(self, v: torch.Tensor) -> torch.Tensor:
        """Return L V."""
        if self.triangular:
            return self.factor @ v
        return self.factor @ (self._root[:, None] * v)

    def columns(self, m: torch.Tensor, start: int, stop: int, rows: int = 1024) -> torch.Tensor:
        """Columns start:stop of M L, reading M (any dtype; float64 products) a block of its columns at a time.

        Never holds M L, nor M in float64: at a 7B down_proj either is 0.34 GiB. Rows of a lower
        triangular L above `start` are zero in these columns and skipped.
        """
        out = None
        for k0 in range(start if self.triangular else 0, m.shape[1], rows):
            k1 = min(k0 + rows, m.shape[1])
            piece = m[:, k0:k1].to(self.factor.dtype) @ self.factor[k0:k1, start:stop]
            out = piece if out is None else out.add_(piece)
        return out if self.triangular else out.mul_(self._root[start:stop])

    def project_(self, m: torch.Tensor, rows: int = 512) -> torch.Tensor:
        """M L L⁺ written into `m`: nothing to do for an invertible L; on the eigen route, the
        projection of M's rows onto G's range (the rows a pseudo-inverse can reach)."""
        if self.triangular:
            return m
        for start in range(0, m.shape[0], rows):
            block = m[start:start + rows]
            block.copy_(self.right_inverse(self.apply(block)))
        return m

    def right_inverse_(self, m: torch.Tensor, rows: int = 512) -> torch.Tensor:
        """`right_inverse` written into `m` (contiguous) by blocks of rows: no second r × in matrix."""
        for start in range(0, m.shape[0], rows):
            block = m[start:start + rows]
            block.copy_(self.right_inverse(block))
        return m


# Columns per block of M·L for a lower-triangular L: block c reads only L's rows from c's first on,
# 0.6–0.7 of the whole product's multiply-adds at 576–1536 wide (the quickstart's products with L,
# profiled on a CPU: 2.6 → 1.8 s, BENCHMARKS.md).
LOWER_BLOCK = 256


def times_lower(m: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """M L for a lower-triangular L, skipping the products with L's zero upper blocks."""
    n = lower.shape[0]
    if n <= LOWER_BLOCK:
        return m @ lower
    out = m.new_empty((*m.shape[:-1], n))
    for start in range(0, n, LOWER_BLOCK):
        stop = min(start + LOWER_BLOCK, n)
        out[..., start:stop] = m[..., start:] @ lower[start:, start:stop]
    return out


# Below this width SciPy's route does not pay: its copy-free call saves little memory, is slower per
# call on small matrices (12 against 3.6 ms at n = 192 here), and its OpenBLAS threads, spinning
# after each call, slowed the torch work that followed by ~20% in a loop of small decompositions.
EIGH_IN_PLACE_FROM = 2048


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric float64 matrix, which is overwritten.

    On a CPU, from EIGH_IN_PLACE_FROM wide, LAPACK's divide-and-conquer (dsyevd) through SciPy puts
    the vectors in the matrix's own memory: torch's eigh copies it first, even given it as `out`
    (3·n² values beside the matrix instead of LAPACK's 2·n² of workspace; at n = 4096, 0.39 against
    0.26 GiB measured, and 9.7 against 8.1 s, on this project's 2-core CPU). Elsewhere torch's eigh,
    written into the matrix.
    """
    if matrix.device.type != "cpu" or matrix.shape[0] < EIGH_IN_PLACE_FROM:
        with torch.inference_mode():  # the walk's Grams are inference tensors
            return torch.linalg.eigh(matrix, out=(matrix.new_empty(matrix.shape[0]), matrix))
    from scipy.linalg import eigh

    # C-ordered and symmetric: its transpose is the same matrix in the Fortran order LAPACK works in
    evals, evecs = eigh(matrix.numpy().T, overwrite_a=True, check_finite=False, driver="evd")
    return torch.from_numpy(evals), torch.from_numpy(evecs)


def _eigen(gram: torch.Tensor, reason: str | None, overwrite: bool = False) -> Whitening:
    """G = R Λ Rᵀ; R takes G's memory with `overwrite`, a copy's without (plus LAPACK's 2·in² workspace)."""
    evals, evecs = symmetric_eigh(gram if overwrite else gram.clone())
    # Eigenvalues below this are rounding noise of a PSD matrix, treated as the null space.
    tol = evals.abs().max().clamp_min(1e-300) * gram.shape[0] * torch.finfo(gram.dtype).eps
    keep = evals > tol
    root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inverse_root = torch.where(keep, 1.0 / root.where(keep, torch.ones_like(root)), torch.zeros_like(root))
    return Whitening(evecs, "eigen", False, int(keep.sum()), reason, root, inverse_root, in_place=overwrite)


# Widths from which an `overwrite` factoring goes in place: below it the copy LAPACK's Cholesky
# makes is small (8 MB at 1024), and every width keeps the exact route it had.
IN_PLACE_FROM = 2048
# Columns per block of the in-place Cholesky: large enough for the products to run at full speed.
BLOCK = 512


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, n)) for start in range(0, n, block)]


@torch.inference_mode()  # the walk's Grams are inference tensors: only updated in place inside it
def _cholesky_in_place(gram: torch.Tensor, block: int = BLOCK) -> int:
    """Write G's Cholesky factor L into the lower block triangle of `gram` (blocked, right-looking).

    Returns 0, or the 1-based index of the pivot that failed. Only the diagonal blocks and the
    blocks below them are written: the blocks above still hold G, which `_restore_gram` uses.
    """
    n = gram.shape[0]
    for j0, j1 in _blocks(n, block):
        diag, info = torch.linalg.cholesky_ex(gram[j0:j1, j0:j1])
        if int(info):
            return j0 + int(info)
        gram[j0:j1, j0:j1] = diag
        if j1 == n:
            break
        panel = gram[j1:, j0:j1]  # L_panel = G_panel · L_diag⁻ᵀ
        panel.copy_(torch.linalg.solve_triangular(diag, panel.mT, upper=False).mT)
        for r0, r1 in _blocks(n - j1, block):  # trailing update of the lower block triangle only
            gram[j1 + r0:j1 + r1, j1:j1 + r1].addmm_(panel[r0:r1], panel[:r1].mT, alpha=-1)
    return 0


@torch.inference_mode()
def _restore_gram(gram: torch.Tensor, diagonal: list[torch.Tensor], block: int = BLOCK) -> None:
    """Undo a partial `_cholesky_in_place`: mirror the untouched upper blocks, put the saved diagonal back.

    Exact for the walk's Grams, which are symmetric to the bit (`symmetrize`)."""
    spans = _blocks(gram.shape[0], block)
    for a, (r0, r1) in enumerate(spans):
        for c0, c1 in spans[:a]:
            gram[r0:r1, c0:c1] = gram[c0:c1, r0:r1].mT
        gram[r0:r1, r0:r1] = diagonal[a]


def _cholesky_problem(info: int, pivots: torch.Tensor | None) -> str | None:
    """Why a Cholesky factor is not used (the eigen route's reason), or None: the one rule of both routes."""
    if info:
        return f"Cholesky failed at pivot {info} (singular or indefinite Gram)"
    # A Cholesky that "succeeds" with pivots at rounding level gives an L⁻¹ that is pure noise.
    if pivots.min() <= pivots.max() * 1e-7:
        return "Cholesky pivots at rounding level (ill-conditioned Gram)"
    return None


def _cholesky_overwriting(gram: torch.Tensor) -> Whitening:
    block = BLOCK
    diagonal = [gram[a:b, a:b].clone() for a, b in _blocks(gram.shape[0], block)]  # n·BLOCK values
    info = _cholesky_in_place(gram, block)
    problem = _cholesky_problem(info, None if info else gram.diagonal())
    if problem:
        _restore_gram(gram, diagonal, block)
        return _eigen(gram, problem, overwrite=True)
    with torch.inference_mode():
        gram.tril_()  # from here on the memory is L's alone
    return Whitening(gram, "cholesky", True, gram.shape[0], in_place=True)


def whitening_factor(gram: torch.Tensor, method: str = "cholesky", overwrite: bool = False) -> Whitening:
    """Factor a symmetric PSD Gram matrix (float64) for whitening.

    `overwrite`: the caller will not read `gram` again, so a wide one (from IN_PLACE_FROM) is
    factored in its own memory. When Cholesky fails there, G is restored exactly before the
    eigen route, which then puts R in its memory; either way G is gone after (`Whitening.in_place`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown whitening method {method!r}; allowed: {', '.join(METHODS)}")
    # Cholesky and eigh read the lower triangle only, so an upper triangle that drifted from exact
    # symmetry is ignored without a symmetrised copy: at a 7B model's down_proj that copy alone is
    # 0.97 GB on top of the Gram and its factor.
    gram = gram.to(torch.float64)
    if not all_finite(gram):
        raise FloatingPointError("the Gram matrix contains NaN or Inf")
    overwrite = overwrite and gram.shape[0] >= IN_PLACE_FROM
    if method == "eigen":
        return _eigen(gram, None, overwrite)
    if overwrite:
        return _cholesky_overwriting(gram)
    factor, info = torch.linalg.cholesky_ex(gram)
    problem = _cholesky_problem(int(info), None if int(info) else factor.diagonal())
    if problem:
        return _eigen(gram, problem)
    return Whitening(factor, "cholesky", True, gram.shape[0])
