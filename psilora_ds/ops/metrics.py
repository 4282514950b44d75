"""Diagonal Kronecker-factored metric statistics for Scaled PSI-LoRA (METHOD.md section 4).

Statistics are returned as *sums* plus a row count so that data-parallel engines can
all-reduce them before they are turned into per-step estimates.
"""

from __future__ import annotations

import torch

from .factored import gradient_gram_diagonals
from .linalg import compute_dtype


def kfac_sums(X: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_rows X**2 (n,), sum_rows Z**2 (m,))`` in the compute dtype."""
    cd = compute_dtype(X.dtype)
    return X.to(cd).square().sum(0), Z.to(cd).square().sum(0)


def kfac_diagonals(
    sum_x2: torch.Tensor, sum_z2: torch.Tensor, rows: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal K-FAC factors ``(diag E[x x^T], diag E[g g^T])`` of one step.

    ``E[x x^T]`` is the row mean of ``X**2``. Captured ``Z`` rows are ``scaling * dL/dy`` of a loss
    that averages over ``rows`` rows, so a per-example output gradient is ``rows * z / scaling``
    and ``E[g g^T] = rows * sum(z**2) / scaling**2``. Dividing out ``scaling`` keeps the metric in
    effective-weight units (METHOD.md section 1), so ``lr`` does not depend on ``lora_alpha``.
    """
    rows = max(int(rows), 1)
    return sum_x2 / rows, sum_z2 * (rows / scaling**2)


def shampoo_diagonals(
    X: torch.Tensor, Z: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal Shampoo statistics ``(diag(G^T G) (n,), diag(G G^T) (m,))`` with ``G = Z^T X / scaling``,
    via Gram matrices (never forming G unless that is cheaper)."""
    d_in, d_out = gradient_gram_diagonals(Z, X)
    return d_in / scaling**2, d_out / scaling**2


def factored_second_moments(Y: torch.Tensor, W: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor's statistics of ``G = P / scaling`` (METHOD.md section 4): its column and row sums of squares
    ``(C (n,), R (m,))``, ``C_j = sum_i G_ij^2``, ``R_i = sum_j G_ij^2``, estimated without ``G`` from the sketches
    ``Y = P Omega`` (m x k) and ``W = Psi P`` (l x n) with standard Gaussian ``Omega``, ``Psi``: ``(Y_i Y_i^T) / k``
    is ``chi^2_k / k`` times ``R_i`` (unbiased, relative sd ``sqrt(2 / k)``), and likewise each column of ``W``."""
    k, l = Y.shape[1], W.shape[0]
    return W.square().sum(0) / (l * scaling**2), Y.square().sum(1) / (k * scaling**2)


def adafactor_normalized(stat: torch.Tensor) -> torch.Tensor:
    """``stat / sqrt(sum stat)``: with ``R`` and ``C`` so normalized, ``R_i C_j`` is Adafactor's rank-1 estimate
    ``R_i C_j / sum R`` of ``G_ij^2`` (``sum R = sum C = ||G||_F^2``), split evenly between the two sides."""
    return stat / stat.sum().sqrt().clamp_min(torch.finfo(stat.dtype).tiny)


def damped_power(stat: torch.Tensor, damping: float, power: float) -> torch.Tensor:
    """``(stat + damping) ** power``: the diagonal metric used by F-LoRSum."""
    return (stat + damping).pow(power)
