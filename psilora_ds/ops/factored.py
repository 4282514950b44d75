"""Quantities of a factored gradient ``P = Z^T X`` computed without forming P when that is
cheaper: exact ones by Gram products over row chunks (METHOD.md sections 4 and 6), and the
sketch ``P Omega`` of its norm (random probes: :mod:`~psilora_ds.ops.random_probes`).

``Z`` is ``N x m`` (output gradients), ``X`` is ``N x n`` (inputs). Forming P costs
``N m n``; the Gram route costs ``N^2 (m + n)``; each function takes the cheaper exact one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .linalg import compute_dtype, thin_product

DEFAULT_CHUNK_ROWS = 1024


def _gram_is_cheaper(Z: torch.Tensor, X: torch.Tensor) -> bool:
    N, m = Z.shape
    n = X.shape[1]
    return N * (m + n) <= m * n


def dense_gradient(Z: torch.Tensor, X: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """``P = Z^T X`` (m x n) in the compute dtype, accumulated over row chunks."""
    cd = compute_dtype(Z.dtype if Z.dtype == torch.float64 else X.dtype)
    P = torch.zeros(Z.shape[1], X.shape[1], dtype=cd, device=Z.device)
    for s in range(0, Z.shape[0], chunk_rows):
        P.addmm_(Z[s : s + chunk_rows].to(cd).T, X[s : s + chunk_rows].to(cd))
    return P


def _row_chunk_grams(
    Z: torch.Tensor, X: torch.Tensor, chunk_rows: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, Z_c, X_c, Z_rows Z_c^T, X_rows X_c^T)`` for row chunks, in the compute dtype."""
    cd = compute_dtype(Z.dtype if Z.dtype == torch.float64 else X.dtype)
    Zc, Xc = Z.to(cd), X.to(cd)
    for s in range(0, Zc.shape[0], chunk_rows):
        rows = slice(s, s + chunk_rows)
        yield rows, Zc, Xc, Zc[rows] @ Zc.T, Xc[rows] @ Xc.T


def frobenius_sq(Z: torch.Tensor, X: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Exact ``||Z^T X||_F^2`` as a 0-dim tensor: ``<Z Z^T, X X^T>`` summed over row chunks
    (the Gram trick), or the dense product when that is cheaper."""
    if not _gram_is_cheaper(Z, X):
        return dense_gradient(Z, X, chunk_rows).square().sum()
    total = torch.zeros((), dtype=compute_dtype(X.dtype), device=X.device)
    for _, _, _, Gz, Gx in _row_chunk_grams(Z, X, chunk_rows):
        total += (Gz * Gx).sum()
    return total


def gradient_gram_diagonals(
    Z: torch.Tensor, X: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag(P^T P) (n,), diag(P P^T) (m,))`` for ``P = Z^T X`` (the Shampoo statistics).

    Gram route: ``diag(P^T P) = (X * ((Z Z^T) X)).sum(0)`` and ``diag(P P^T) = (Z * ((X X^T) Z)).sum(0)``.
    """
    if not _gram_is_cheaper(Z, X):
        P = dense_gradient(Z, X, chunk_rows)
        return P.square().sum(0), P.square().sum(1)
    cd = compute_dtype(X.dtype)
    d_in = torch.zeros(X.shape[1], dtype=cd, device=X.device)
    d_out = torch.zeros(Z.shape[1], dtype=cd, device=Z.device)
    for rows, Zc, Xc, Gz, Gx in _row_chunk_grams(Z, X, chunk_rows):
        d_in += (Xc[rows] * (Gz @ Xc)).sum(0)
        d_out += (Zc[rows] * (Gx @ Zc)).sum(0)
    return d_in, d_out


NORM_SKETCH_SEED = 0x7A5C


def norm_sketch_seed(step: int) -> int:
    """The seed of the clipping-norm probes at one step (the same on every rank; each layer takes its rows of it,
    :func:`~psilora_ds.ops.random_probes.probe_row_offsets`)."""
    return NORM_SKETCH_SEED + 1_000_003 * step


def sketched_product(Z: torch.Tensor, X: torch.Tensor, omega: torch.Tensor,
                     dense: torch.Tensor | None = None) -> torch.Tensor:
    """``P Omega = Z^T (X Omega) (+ P_dense Omega)`` (m x k) in ``omega``'s dtype: ``N k (m + n)`` work
    instead of ``min(N m n, N^2 (m + n))`` for the exact norm. For probes with ``E[omega omega^T] = I`` (random
    signs, :func:`~psilora_ds.ops.random_probes.sign_probes`) ``E ||P Omega||_F^2 / k = ||P||_F^2``, with variance at
    most ``2 ||P^T P||_F^2 / k``."""
    Y = thin_product(Z.to(omega.dtype).T, X.to(omega.dtype) @ omega)
    if dense is not None:
        Y += dense.to(omega.dtype) @ omega
    return Y


def thin_products(
    Z: torch.Tensor, X: torch.Tensor, left: torch.Tensor, right: torch.Tensor, omega: torch.Tensor | None = None,
    two_sided: tuple[torch.Tensor, torch.Tensor] | None = None, row_sums: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """What a Jacobi step needs of ``P = Z^T X``, for factors known before the backward pass
    (METHOD.md section 6, cache-free steps): ``(left^T P (q x n), P right^T (m x q), sum_rows X**2 (n,),
    sum_rows Z**2 (m,) (None without ``row_sums``), P Omega (m x k) or None, P Omega_s (m x k_s) or None,
    Psi P (l x n) or None)`` in ``left``'s
    dtype, for ``left`` m x q (e.g. ``[B, M_B]``), ``right`` q x n (e.g. ``[A; M_A]``), the clipping norm's probes
    ``omega`` (n x k) and the two-sided sketch's ``two_sided = (Omega_s, Psi)`` (n x k_s, l x n). ``N (q + k + k_s +
    l)(m + n)`` work; all are linear in the rows, so they add up over micro-batches and ranks.

    Fused: every product on the right, ``P [right^T, Omega, Omega_s] = Z^T (X [...])``, is one pair of matrix products,
    and every product on the left, ``[left, Psi^T]^T P = (Z [...])^T X``, another: the same work as one pair each, in
    wider (faster) matrix products (bench/thin_products.py)."""
    cd = left.dtype
    Zc, Xc = Z.to(cd), X.to(cd)
    on_right = [right.T] + ([] if omega is None else [omega]) + ([] if two_sided is None else [two_sided[0]])
    on_left = [left] + ([] if two_sided is None else [two_sided[1].T])
    right_all = thin_product(Zc.T, Xc @ (torch.cat(on_right, 1) if len(on_right) > 1 else on_right[0]))
    left_all = (Zc @ (torch.cat(on_left, 1) if len(on_left) > 1 else on_left[0])).T @ Xc
    right_p, *rest = right_all.split([t.shape[1] for t in on_right], 1)
    left_p, *corange = left_all.split([t.shape[1] for t in on_left], 0)
    sketch = rest.pop(0) if omega is not None else None
    range_sketch = rest.pop(0) if two_sided is not None else None
    corange_sketch = corange[0] if two_sided is not None else None
    sums = (Xc.square().sum(0), Zc.square().sum(0)) if row_sums else (None, None)
    return (left_p.contiguous(), right_p.contiguous(), *sums,
            None if sketch is None else sketch.contiguous(), None if range_sketch is None else range_sketch.contiguous(),
            corange_sketch)


def factor_gradients(factors: tuple[torch.Tensor, ...], BtP: torch.Tensor,
                     PAt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of a layer's factors, in their order, from the two thin products of ``P`` (the gradient w.r.t.
    their product) at them: ``(B^T P, P A^T)`` for ``(A, B)``; for ``(A, S, B)`` (a core between, PoLAR's
    ``B S A``) the chain rule's ``(S^T B^T P, B^T P A^T, P A^T S^T)`` (METHOD.md section 7)."""
    if len(factors) == 2:
        return BtP, PAt
    A, S, _ = factors
    return S.mT @ BtP, BtP @ A.mT, PAt @ S.mT
