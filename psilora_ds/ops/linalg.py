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


def thin_product(F: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``F @ Y`` for a thin ``Y`` (``k`` columns). Where ``F`` is the transposed view of rows (``Z^T`` for rows ``Z``
    stored N x m), as ``(Y^T F^T)^T``: the same sums, but CPU BLAS multiplies a transposed left operand by a thin
    matrix 1.3-2x slower than it forms the wide ``k x m`` product (``bench/thin_products.py --orientation``).
    Returns a transposed view there; callers that need rows make it contiguous."""
    if F.dim() == 2 and F.stride(0) == 1 and not F.is_contiguous():
        return (Y.mT @ F.mT).mT
    return F @ Y


def _fallback(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Cholesky failed (G numerically indefinite, e.g. a rank-deficient factor with a tiny proximal
    weight): least squares, exact for a non-singular G and the minimum-norm answer otherwise."""
    if not (bool(torch.isfinite(G).all()) and bool(torch.isfinite(R).all())):
        # diverged factors (inf/NaN): propagate NaN like any optimizer would, instead of crashing LAPACK;
        # the next step's non-finite captures are then skipped and counted
        logger.warning("non-finite %dx%d LoRSum system (diverged factors?): result is NaN", *G.shape)
        return torch.full_like(R, float("nan"))
    logger.debug("Cholesky failed on a %dx%d system; using lstsq", *G.shape)
    # gelsd (SVD): the CPU default gelsy returned wrong answers (zero, or not the minimum norm) for about one
    # rank-deficient call in eight on this stack (torch 2.13 CPU), nondeterministically
    return torch.linalg.lstsq(G, R, driver="gelsd" if G.device.type == "cpu" else None).solution


@dataclass
class SPDSolve:
    """One small symmetric positive definite system: ``G @ Y = R`` (``side="left"``) or ``Y @ G = R``
    (``side="right"``). LoRSum's programs yield these so that the driver solves every layer's systems
    of one round together (:func:`solve_spd_batch`)."""

    G: torch.Tensor
    R: torch.Tensor
    side: str = "left"


def solve_spd_batch(systems: Sequence[SPDSolve], *, sync_free: bool | None = None) -> list[torch.Tensor]:
    """Solve many small SPD systems with one batched Cholesky factorization and inverse per bucket of equal
    shape, dtype and device, instead of one per system. For the r x r systems of LoRSum the inverse times the
    thin right-hand side is several times faster than ``cholesky_solve`` on CPU, with the same O(cond * eps)
    forward error. A failed factorization (numerically indefinite or singular G) falls back to the
    minimum-norm least-squares answer for that system; a non-finite system gives NaN. A system may be a stack
    (``G`` ``(L, r, r)``, ``R`` ``(L, r, k)`` or ``(L, k, r)``: a stack of layers stepped together), each matrix of
    it a system of its own.

    ``sync_free`` (default: on any device but the CPU): never read the factorization's status on the host —
    each read is a device sync on a GPU — but compute the fallback (a regularized pseudo-inverse, see
    :func:`_select_fallback`) for the whole bucket and select it where the factorization failed. Off (the CPU, where
    a read costs nothing): one read per bucket, and the fallback only for the systems that need it."""
    out: list[torch.Tensor | None] = [None] * len(systems)
    buckets: dict[tuple, list[int]] = {}
    for i, s in enumerate(systems):
        buckets.setdefault((tuple(s.G.shape[-2:]), s.G.dtype, s.G.device), []).append(i)
    for (shape, _, device), members in buckets.items():
        # every system's matrices in one batch: (1, r, r) for a single system, (L, r, r) for a stack
        sizes = [systems[i].G.shape[0] if systems[i].G.dim() == 3 else 1 for i in members]
        G = torch.cat([systems[i].G.reshape(-1, *shape) for i in members]) if len(members) > 1 \
            else systems[members[0]].G.reshape(-1, *shape)
        L, info = torch.linalg.cholesky_ex(G)
        inverse = _inverse_from_cholesky(L)
        failed: set[int] = set()
        if sync_free if sync_free is not None else device.type != "cpu":
            inverse = _select_fallback(G, inverse, info)
        elif bool(info.any()):  # the bucket's one host read
            failed = set(torch.nonzero(info).flatten().tolist())
        start = 0
        for i, size in zip(members, sizes):
            s = systems[i]
            if s.G.dim() == 2:
                inv = inverse[start]
                out[i] = _solve_one(s, inv) if start not in failed else _fallback_one(s)
            else:  # a stack: the matrices whose factorization failed by the fallback, each on its own
                out[i] = _solve_one(s, inverse[start: start + size])
                for j in sorted(f - start for f in failed if start <= f < start + size):
                    out[i][j] = _fallback_one(SPDSolve(s.G[j], s.R[j], s.side))
            start += size
    return out  # type: ignore[return-value]


def _solve_one(s: SPDSolve, inverse: torch.Tensor) -> torch.Tensor:
    """``G^-1 R`` or ``R G^-1`` from ``G``'s inverse (a matrix, or a stack)."""
    return inverse @ s.R if s.side == "left" else s.R @ inverse


def _fallback_one(s: SPDSolve) -> torch.Tensor:
    """The least-squares answer of one system (one matrix) whose Cholesky factorization failed."""
    left = _fallback(s.G, s.R if s.side == "left" else s.R.transpose(-1, -2))
    return left if s.side == "left" else left.transpose(-1, -2)


def _inverse_from_cholesky(L: torch.Tensor) -> torch.Tensor:
    """``G^-1 = L^-T L^-1`` for a batch of lower Cholesky factors, by triangular solves, which neither check nor
    raise (``cholesky_inverse`` raises on a zero pivot, i.e. reads the status on the host): a failed
    factorization gives non-finite entries, replaced by the caller."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    return L_inv.transpose(-1, -2) @ L_inv


def _select_fallback(G: torch.Tensor, inverse: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """``inverse`` (a batch from Cholesky) where the factorization succeeded, else the Tikhonov pseudo-inverse
    ``(G^2 + mu I)^-1 G`` of the symmetric ``G`` with ``mu = eps ||G||^2`` — the minimum-norm least-squares
    operator up to O(eps) on G's range, 0 on its null space (as ``lstsq``) — NaN where ``G`` is not finite.
    All on the device: Cholesky of the positive definite ``G^2 + mu I`` and triangular solves, which read
    nothing back (``eigh``, ``pinv`` and ``lstsq`` check their status on the host, and CUDA's ``lstsq`` is not
    minimum-norm)."""
    finite = torch.isfinite(G).flatten(-2).all(-1)[:, None, None]
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    safe = torch.where(finite, G, eye)
    scale = safe.abs().flatten(-2).amax(-1)[:, None, None].clamp_min(torch.finfo(G.dtype).tiny)
    square = safe @ safe
    mu = torch.finfo(G.dtype).eps * (G.shape[-1] * scale) ** 2
    L2, _ = torch.linalg.cholesky_ex(square + mu * eye)
    pinv = _inverse_from_cholesky(L2) @ safe
    chosen = torch.where((info == 0)[:, None, None], inverse, pinv)
    return torch.where(finite, chosen, torch.full_like(chosen, float("nan")))


def solve_spd_left(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Solve ``G @ Y = R`` for a small symmetric positive definite ``G`` (r x r): Cholesky, with a
    least-squares fallback when the factorization fails."""
    return solve_spd_batch([SPDSolve(G, R, "left")])[0]


def solve_spd_right(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Solve ``Y @ G = R`` for a small symmetric positive definite ``G``."""
    return solve_spd_batch([SPDSolve(G, R, "right")])[0]
