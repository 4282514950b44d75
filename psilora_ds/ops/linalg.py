"""Small dense linear algebra shared by the kernels: compute dtype and SPD solves."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float32, or float64 when the input already is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


@dataclass
class SPDSolve:
    """One small symmetric positive definite system: ``G @ Y = R`` (``side="left"``) or ``Y @ G = R``
    (``side="right"``). LoRSum's programs yield these so that the driver solves every layer's systems
    of one round together (:func:`solve_spd_batch`)."""

    G: torch.Tensor
    R: torch.Tensor
    side: str = "left"


def solve_spd_batch(systems: Sequence[SPDSolve]) -> list[torch.Tensor]:
    """Solve many small SPD systems: one batched Cholesky factorization and inverse per bucket of equal
    shape, dtype and device, and ONE host synchronization per bucket (reading whether any factorization
    failed; on a GPU each read is a device sync), instead of one per system. For the r x r systems of
    LoRSum the inverse times the thin right-hand side is several times faster than ``cholesky_solve`` on
    CPU, with the same O(cond * eps) forward error. A failed factorization (numerically indefinite G)
    falls back to least squares for that system only."""
    out: list[torch.Tensor | None] = [None] * len(systems)
    buckets: dict[tuple, list[int]] = {}
    for i, s in enumerate(systems):
        buckets.setdefault((tuple(s.G.shape), s.G.dtype, s.G.device), []).append(i)
    for members in buckets.values():
        G = torch.stack([systems[i].G for i in members]) if len(members) > 1 else systems[members[0]].G[None]
        L, info = torch.linalg.cholesky_ex(G)
        inverse = torch.cholesky_inverse(L)
        failed = set(torch.nonzero(info).flatten().tolist()) if bool(info.any()) else set()  # the host sync
        for j, i in enumerate(members):
            s = systems[i]
            if j in failed:
                left = _fallback(s.G, s.R if s.side == "left" else s.R.transpose(-1, -2))
                out[i] = left if s.side == "left" else left.transpose(-1, -2)
            else:
                out[i] = inverse[j] @ s.R if s.side == "left" else s.R @ inverse[j]
    return out  # type: ignore[return-value]


def solve_spd_left(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Solve ``G @ Y = R`` for a small symmetric positive definite ``G`` (r x r): Cholesky, with a
    least-squares fallback when the factorization fails."""
    return solve_spd_batch([SPDSolve(G, R, "left")])[0]


def solve_spd_right(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Solve ``Y @ G = R`` for a small symmetric positive definite ``G``."""
    return solve_spd_batch([SPDSolve(G, R, "right")])[0]
