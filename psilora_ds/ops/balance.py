"""Re-factor a low-rank product ``B A`` without changing it (a gauge choice; METHOD.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .linalg import compute_dtype


@dataclass
class Balance:
    """A request to re-factor ``B A`` in balanced form: programs of rounds yield it (:mod:`~psilora_ds.ops.rounds`)
    and receive ``(A', B')``; the driver balances every waiting layer's together (:func:`balance_factors_batch`)."""

    A: torch.Tensor
    B: torch.Tensor


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' A' = B A`` and balanced factors: ``B' = U S^1/2``, ``A' = S^1/2 V^T`` from
    the SVD of the product ``U S V^T``, through thin QRs of ``B`` (m x k) and ``A^T`` (n x k) and the SVD
    of the k x k core; O((m + n) k^2). Directions where the product vanishes keep a tiny scale
    (``eps * S_max``) so that an ALS warm-started here can still turn them; a zero product is returned
    unchanged."""
    return balance_factors_batch([(A, B)])[0]


def balance_factors_batch(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                          route: Literal["auto", "qr", "gram"] = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`balance_factors` of every ``(A, B)``, the pairs of equal shapes, dtype and device stacked: one batched
    factorization per bucket instead of one per pair, and no host read (a zero product is kept by selection, not by a
    branch). ``route`` "auto": factors narrower than float64 through float64 Gram matrices (:func:`_gram_balance`),
    float64 factors through Householder QRs (:func:`_qr_balance`); "qr" or "gram": that route for all (benches and
    tests compare them)."""
    if route not in ("auto", "qr", "gram"):
        raise ValueError(f"balance_factors_batch: route must be 'auto', 'qr' or 'gram', got {route!r}")
    buckets: dict[tuple, list[int]] = {}
    for i, (A, B) in enumerate(pairs):
        buckets.setdefault((A.shape, B.shape, A.dtype, B.dtype, A.device), []).append(i)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pairs)
    for idxs in buckets.values():
        A0, B0 = pairs[idxs[0]]
        work = compute_dtype(A0.dtype)
        balance = _gram_balance if route == "gram" or (route == "auto" and work != torch.float64) else _qr_balance
        if len(idxs) == 1:  # (one pair: a layer stack's, or one layer's; nothing to stack, its results its own)
            A_bal, B_bal = balance(A0, B0, work)
            out[idxs[0]] = (A_bal.to(A0.dtype), B_bal.to(B0.dtype))
            continue
        stacked = (torch.stack([pairs[i][side] for i in idxs]) for side in (0, 1))
        A_bal, B_bal = balance(*stacked, work)
        for j, i in enumerate(idxs):  # (copies: a view would keep, and checkpoint, the whole bucket's storage)
            out[i] = (A_bal[j].to(A0.dtype, copy=True), B_bal[j].to(B0.dtype, copy=True))
    return out  # type: ignore[return-value]


def _qr_balance(As: torch.Tensor, Bs: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced ``(A', B')`` of stacks ``As`` (L, k, n), ``Bs`` (L, m, k) through Householder QRs ``B = Q_B R_B``,
    ``A^T = Q_A R_A``: ``B' = Q_B U S^1/2``, ``A' = S^1/2 V^T Q_A^T`` (backward stable in ``work``)."""
    As, Bs = As.to(work), Bs.to(work)
    Qb, Rb = torch.linalg.qr(Bs)
    Qa, Ra = torch.linalg.qr(As.mT)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT)
    top = S.amax(-1, keepdim=True)  # (L, 1)
    root = S.clamp_min(torch.finfo(work).eps * top).sqrt()  # (the vanishing directions keep a tiny scale)
    A_bal = (root[..., :, None] * Vh) @ Qa.mT
    B_bal = (Qb @ U) * root[..., None, :]
    zero = (top == 0)[..., None]  # a zero product: the factors as they are
    return torch.where(zero, As, A_bal), torch.where(zero, Bs, B_bal)


def _trace(gram: torch.Tensor) -> torch.Tensor:
    """The traces of a stack of square matrices, shaped ``(..., 1, 1)`` to broadcast against them."""
    return gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]


def _shifted_cholesky_r(gram: torch.Tensor, rows: int) -> torch.Tensor:
    """Upper triangular ``R`` with ``R^T R = G + s I`` for float64 Gram matrices ``G = F^T F`` (L, k, k) of
    ``rows x k`` factors ``F``. The shift ``s = 11 (rows k + k (k + 1)) eps tr(G)`` (shifted CholeskyQR; Fukaya,
    Kannan, Nakatsukasa, Yamamoto and Yamazaki 2020) keeps the factorization defined for a factor of any rank, at a
    relative perturbation of ~1e-13 for these sizes."""
    k = gram.shape[-1]
    trace = _trace(gram)
    eps, tiny = torch.finfo(gram.dtype).eps, torch.finfo(gram.dtype).tiny
    shift = 11 * (rows * k + k * (k + 1)) * eps * trace + tiny
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    lower, _ = torch.linalg.cholesky_ex(gram + shift * eye)  # (positive definite by the shift: no status to read)
    return lower.mT


def _gram_balance(As: torch.Tensor, Bs: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced ``(A', B')`` of stacks ``As`` (L, k, n), ``Bs`` (L, m, k), from k x k float64 Gram matrices instead of
    Householder QRs of the tall factors (the square-root method of balanced truncation; METHOD.md section 3). With
    ``R_A`` upper triangular, ``R_A^T R_A = A A^T`` (:func:`_shifted_cholesky_r`), the product ``B A = (B R_A^T)
    Q_A^T`` has the singular values and right vectors of ``B R_A^T``, from the eigendecomposition
    ``R_A (B^T B) R_A^T = V S^2 V^T``; then

        ``B' = B R_A^T V S^-1/2``,  ``A' = S^1/2 V^T R_A^-T A``,

    ``B' A' = B A`` for any invertible ``R_A`` and orthogonal ``V`` (the k x k algebra in float64; the two thin
    products in ``work`` round as the QR route's do), ``A' A'^T = B'^T B' = S``: the QR route's answer up to the
    signs and order of equal singular values. ``S`` is clamped below at ``eps * S_max`` (``eps`` of ``work``): a
    direction the product does not span keeps a tiny row of ``A'`` (where ``A`` spans it: the momentum's ``A`` keeps
    such rows from the last balancing), so that an ALS warm-started here can turn it (the QR route also gives ``B'``
    a tiny column there; this one a (near) zero one). Two Gram products, a Cholesky
    factorization and an eigendecomposition of k x k matrices and two thin products, no QR of a tall matrix (on the
    CPU a batched QR is a loop of one LAPACK call per matrix): 0.55-0.86x the QR route's time on this project's CPU
    (bench/balance.py; GPUs not measured yet: bench/gpu_suite.sh times both)."""
    wide = torch.float64
    A64, B64 = As.to(wide), Bs.to(wide)
    gram_b, gram_a = B64.mT @ B64, A64 @ A64.mT
    Ra = _shifted_cholesky_r(gram_a, As.shape[-1])
    lam, V = torch.linalg.eigh(Ra @ gram_b @ Ra.mT)
    lam, V = lam.flip(-1), V.flip(-1)  # descending, as the SVD orders them
    S = lam.clamp_min(0).sqrt()
    top = S.amax(-1, keepdim=True)  # (L, 1)
    S = S.clamp_min(torch.finfo(work).eps * top).clamp_min(torch.finfo(wide).tiny)
    # a zero product (either factor zero: the shift alone would make the core tiny, not zero): the factors as they
    # are, by identity transforms (selected on the k x k matrices, not the factors; exact)
    zero = (top == 0)[..., None] | (_trace(gram_b) == 0) | (_trace(gram_a) == 0)
    eye = torch.eye(S.shape[-1], dtype=wide, device=S.device)
    to_B = torch.where(zero, eye, Ra.mT @ (V * S.rsqrt()[..., None, :]))  # R_A^T V S^-1/2
    to_A = torch.where(zero, eye, torch.linalg.solve_triangular(Ra, V * S.sqrt()[..., None, :], upper=True).mT)
    return to_A.to(work) @ As.to(work), Bs.to(work) @ to_B.to(work)  # (S^1/2 V^T R_A^-T) A, B (R_A^T V S^-1/2)
