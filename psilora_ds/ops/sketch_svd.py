"""The spectral first step without rows: a one-pass, two-sided sketch of a layer's gradient, reconstructed to rank r
(Tropp, Yurtsever, Udell and Cevher 2017, "Practical sketching algorithms for low-rank matrix approximation";
METHOD.md section 5).

The hooks add, per micro-batch, ``Y = P Omega`` (m x k) and ``W = Psi P`` (l x n) for ``P = Z^T X``, with Gaussian
``Omega`` (n x k) and ``Psi`` (l x m) drawn from a seed every rank shares; both are linear in the rows, so they add up
over micro-batches and ranks like the cache-free thin products. The step then reconstructs ``Q = orth(Y)``,
``C = (Psi Q)^+ W`` and ``[[Q C]]_r`` from ``O((m + n) k^2)`` work. For ``k = 2r + 1``, ``l = 2k + 1`` and any ``P``
(Tropp et al. 2017, Theorems 4.3 and 5.1 with ``rho = r``)::

    E ||P - [[P^]]_r||_F <= tau_{r+1}(P) * (1 + 2 sqrt((1 + k / (l - k - 1)) (1 + r / (k - r - 1)))) = 5 tau_{r+1}(P)

with ``tau_{r+1}(P)^2 = sum_{j > r} s_j(P)^2`` the error of the exact truncated SVD; exact when ``rank(P) <= k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .balance import balance_factors
from .factored import sketched_product
from .linalg import compute_dtype
from .random_probes import gaussian_probes

SPECTRAL_SKETCH_SEED = 0x5BEC7  # (distinct from the clipping norm's probes)


def sketch_widths(rank: int, m: int, n: int) -> tuple[int, int]:
    """``(k, l)``: range width ``2 r + 1`` and co-range width ``2 k + 1`` (Tropp et al. 2017, section 4.5: a third of
    the storage on the range side), capped by the layer's shape (then exact: ``k = min(m, n)`` spans the range)."""
    k = min(2 * rank + 1, m, n)
    return k, min(2 * k + 1, m)


def gradient_sketch_seed(step: int, layer_index: int) -> int:
    """The seed of one layer's sketch probes at one step (the same on every rank)."""
    return SPECTRAL_SKETCH_SEED + 1_000_003 * step + 7919 * layer_index


def sketch_probes(m: int, n: int, rank: int, seed: int, *, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Omega (n x k), Psi (l x m))``, standard Gaussian from ``seed`` (:func:`~psilora_ds.ops.gaussian_probes`)."""
    k, l = sketch_widths(rank, m, n)
    omega = gaussian_probes(n, k, seed, dtype=dtype, device=device)
    psi = gaussian_probes(m, l, seed + 1, dtype=dtype, device=device).T
    return omega, psi


def range_corange_products(Z: torch.Tensor, X: torch.Tensor, omega: torch.Tensor,
                           psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P Omega, Psi P)`` for ``P = Z^T X`` (``Z`` N x m, ``X`` N x n) in ``omega``'s dtype: ``N (k + l)(m + n)``
    work, no m x n matrix."""
    cd = psi.dtype
    return sketched_product(Z, X, omega), (Z.to(cd) @ psi.T).T @ X.to(cd)


@dataclass
class GradientSketch:
    """A layer's sketched gradient ``P``: ``Y = P Omega`` (m x k), ``W = Psi P`` (l x n) and the probes."""

    Y: torch.Tensor
    W: torch.Tensor
    omega: torch.Tensor
    psi: torch.Tensor

    def scaled(self, c: float) -> GradientSketch:
        return GradientSketch(self.Y * c, self.W * c, self.omega, self.psi)


def truncated_from_sketch(Y: torch.Tensor, W: torch.Tensor, psi: torch.Tensor,
                          rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``, balanced (``B = U s^1/2``, ``A = s^1/2 V^T``), with ``B A = [[Q C]]_r``, ``Q = orth(Y)``,
    ``C = (Psi Q)^+ W``: the rank-``rank`` reconstruction of the matrix ``S`` sketched as ``Y = S Omega``,
    ``W = Psi S``."""
    Q, _ = torch.linalg.qr(Y)
    Q2, R2 = torch.linalg.qr(psi @ Q)  # Psi Q (l x k) has full column rank almost surely (l >= k)
    C = torch.linalg.solve_triangular(R2, Q2.T @ W, upper=True)  # k x n
    U, s, Vh = torch.linalg.svd(C, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * Vh[:rank], (Q @ U[:, :rank]) * root[None, :]


def data_signs(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with one sign per pair (row of ``A``, column of ``B``) chosen by the data, each column of ``B``
    with its largest entry positive, not by LAPACK: the same factors on every engine, whose sketches differ by
    rounding (``B A`` does not depend on it)."""
    flip = torch.where(B.gather(0, B.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0).to(B.dtype)
    return A * flip.T, B * flip


def spectral_step_from_sketch(
    A: torch.Tensor, B: torch.Tensor, sketch: GradientSketch, *, c0: float = 1.0,
    terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]] = (), d_out: torch.Tensor | None = None,
    d_in: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectral first step (METHOD.md section 5) from a sketch: the best rank-r approximation ``B' A'`` of
    ``T~ = c0 B A + D_out^-1 (P + sum_j c_j F_j H_j) D_in^-1`` in the metric norm ``||D_out^1/2 . D_in^1/2||_F``
    (plain Frobenius without metrics), where ``P`` is known by ``sketch`` (already scaled) and the ``(c_j, F_j, H_j)``
    are low-rank terms known exactly (the momentum). What LoRSum's ``first_step_iters`` iterations converge to, from
    one pass over the rows.

    With ``S = D_out^1/2 T~ D_in^1/2`` the reconstruction is of ``S`` (then ``B A = D_out^-1/2 [[S]]_r D_in^-1/2``,
    :func:`~psilora_ds.ops.weighted_svd_project`), sketched through ``Omega~ = D_in^1/2 Omega`` and
    ``Psi~ = Psi D_out^1/2``: ``S Omega~ = c0 D_out^1/2 B A D_in Omega + D_out^-1/2 Y'`` and
    ``Psi~ S = c0 Psi D_out B A D_in^1/2 + W' D_in^-1/2``, with ``Y'``, ``W'`` the sketches of
    ``P + sum_j c_j F_j H_j``. Returns ``(A', B')`` in ``A``'s dtype, balanced."""
    out_dtype, r = A.dtype, A.shape[0]
    cd = torch.promote_types(compute_dtype(A.dtype), sketch.Y.dtype)
    A0, B0 = A.to(cd), B.to(cd)
    omega, psi = sketch.omega.to(cd), sketch.psi.to(cd)
    Y, W = sketch.Y.to(cd, copy=True), sketch.W.to(cd, copy=True)
    for c, F, H in terms:
        F, H = F.to(cd), H.to(cd)
        Y.add_(F @ (H @ omega), alpha=c)
        W.add_((psi @ F) @ H, alpha=c)
    ones_out = torch.ones(B0.shape[0], dtype=cd, device=B0.device)
    ones_in = torch.ones(A0.shape[1], dtype=cd, device=A0.device)
    so = ones_out if d_out is None else d_out.to(cd).sqrt()
    si = ones_in if d_in is None else d_in.to(cd).sqrt()
    Y_S = Y / so[:, None]
    W_S = W / si[None, :]
    if c0 != 0:
        Y_S.add_((so[:, None] * B0) @ (A0 @ (si.square()[:, None] * omega)), alpha=c0)
        W_S.add_(((psi * so.square()[None, :]) @ B0) @ (A0 * si[None, :]), alpha=c0)
    A_S, B_S = truncated_from_sketch(Y_S, W_S, psi * so[None, :], r)
    A_new, B_new = data_signs(*balance_factors(A_S / si[None, :], B_S / so[:, None]))
    return A_new.to(out_dtype).contiguous(), B_new.to(out_dtype).contiguous()
