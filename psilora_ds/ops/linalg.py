"""Small dense linear algebra shared by the kernels: compute dtype and SPD solves."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float32, or float64 when the input already is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spd_inverse(G: torch.Tensor) -> torch.Tensor | None:
    """``G^-1`` from its Cholesky factor, or None when the factorization fails. For the r x r systems
    of LoRSum, the inverse times the thin right-hand side is several times faster than
    ``cholesky_solve`` on CPU (no batched copies), with the same O(cond * eps) forward error."""
    L, info = torch.linalg.cholesky_ex(G)
    return torch.cholesky_inverse(L) if int(info) == 0 else None


def _fallback(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Cholesky failed (G numerically indefinite, e.g. a rank-deficient factor with a tiny proximal
    weight): least squares, exact for a non-singular G and the minimum-norm answer otherwise."""
    if not (bool(torch.isfinite(G).all()) and bool(torch.isfinite(R).all())):
        # diverged factors (inf/NaN): propagate NaN like any optimizer would, instead of crashing LAPACK;
        # the next step's non-finite captures are then skipped and counted
        logger.warning("non-finite %dx%d LoRSum system (diverged factors?): result is NaN", *G.shape)
        return torch.full_like(R, float("nan"))
    logger.debug("Cholesky failed on a %dx%d system; using lstsq", *G.shape)
    return torch.linalg.lstsq(G, R).solution


def solve_spd_left(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Solve ``G @ Y = R`` for a small symmetric positive definite ``G`` (r x r): Cholesky, with a
    least-squares fallback when the factorization fails."""
    inv = _spd_inverse(G)
    return inv @ R if inv is not None else _fallback(G, R)


def solve_spd_right(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Solve ``Y @ G = R`` for a small symmetric positive definite ``G``."""
    inv = _spd_inverse(G)
    return R @ inv if inv is not None else _fallback(G, R.transpose(-1, -2)).transpose(-1, -2)
