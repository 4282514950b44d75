"""Re-factor a low-rank product ``B A`` without changing it (a gauge choice; METHOD.md section 3)."""

from __future__ import annotations

import torch

from .linalg import compute_dtype


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' A' = B A`` and balanced factors: ``B' = U S^1/2``, ``A' = S^1/2 V^T`` from
    the SVD of the product ``U S V^T``, through thin QRs of ``B`` (m x k) and ``A^T`` (n x k) and the SVD
    of the k x k core; O((m + n) k^2). Directions where the product vanishes keep a tiny scale
    (``eps * S_max``) so that an ALS warm-started here can still turn them; a zero product is returned
    unchanged."""
    dtype = A.dtype
    work = compute_dtype(dtype)
    Qb, Rb = torch.linalg.qr(B.to(work))
    Qa, Ra = torch.linalg.qr(A.to(work).T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    top = S.max()
    if top == 0:
        return A, B
    root = S.clamp_min(torch.finfo(work).eps * top).sqrt()
    return ((root[:, None] * Vh) @ Qa.T).to(dtype), ((Qb @ U) * root).to(dtype)
