"""Re-factor a low-rank product ``B A`` without changing it (a gauge choice; METHOD.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def balance_factors_batch(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`balance_factors` of every ``(A, B)``, the pairs of equal shapes, dtype and device stacked: one batched
    QR of each side and one batched SVD of the cores per bucket instead of one of each per pair, and no host read (a
    zero product is kept by selection, not by a branch)."""
    buckets: dict[tuple, list[int]] = {}
    for i, (A, B) in enumerate(pairs):
        buckets.setdefault((A.shape, B.shape, A.dtype, B.dtype, A.device), []).append(i)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pairs)
    for idxs in buckets.values():
        A0, B0 = pairs[idxs[0]]
        work = compute_dtype(A0.dtype)
        As = torch.stack([pairs[i][0] for i in idxs]).to(work)  # (L, k, n)
        Bs = torch.stack([pairs[i][1] for i in idxs]).to(work)  # (L, m, k)
        Qb, Rb = torch.linalg.qr(Bs)
        Qa, Ra = torch.linalg.qr(As.mT)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.mT)
        top = S.amax(-1, keepdim=True)  # (L, 1)
        root = S.clamp_min(torch.finfo(work).eps * top).sqrt()
        A_bal = (root[..., :, None] * Vh) @ Qa.mT
        B_bal = (Qb @ U) * root[..., None, :]
        zero = (top == 0)[..., None]  # a zero product: keep the factors as they are
        A_bal, B_bal = torch.where(zero, As, A_bal), torch.where(zero, Bs, B_bal)
        for j, i in enumerate(idxs):  # (copies: a view would keep, and checkpoint, the whole bucket's storage)
            out[i] = (A_bal[j].to(A0.dtype, copy=True), B_bal[j].to(B0.dtype, copy=True))
    return out  # type: ignore[return-value]
