"""The SVDLoRA oracle: dense truncated SVD of a step, split back into LoRA factors (METHOD.md section 5)."""

from __future__ import annotations

import torch

from .linalg import compute_dtype


def svd_project(T: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of a dense ``m x n`` matrix (Eckart-Young), balanced:
    returns ``(A, B)`` with ``A = S^1/2 V^T`` (rank x n) and ``B = U S^1/2`` (m x rank)."""
    work = compute_dtype(T.dtype)
    try:
        U, S, Vh = torch.linalg.svd(T.to(work), full_matrices=False)
    except torch.linalg.LinAlgError:
        # LAPACK's divide-and-conquer SVD (gesdd) rarely fails to converge in float32 on a finite matrix; float64 does
        if not torch.isfinite(T).all():
            raise ValueError("svd_project: the target has non-finite entries") from None
        U, S, Vh = torch.linalg.svd(T.to(torch.float64), full_matrices=False)
        U, S, Vh = U.to(work), S.to(work), Vh.to(work)
    root = S[:rank].sqrt()
    return (root[:, None] * Vh[:rank]).to(T.dtype), (U[:, :rank] * root[None, :]).to(T.dtype)


def weighted_svd_project(
    T: torch.Tensor, rank: int, d_out: torch.Tensor, d_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimizer of ``||D_out^1/2 (B A - T) D_in^1/2||_F`` over rank-``rank`` products:
    ``B A = D_out^-1/2 svd_r(D_out^1/2 T D_in^1/2) D_in^-1/2``."""
    so, si = d_out.to(T.dtype).sqrt(), d_in.to(T.dtype).sqrt()
    A, B = svd_project(so[:, None] * T * si[None, :], rank)
    return A / si[None, :], B / so[:, None]
