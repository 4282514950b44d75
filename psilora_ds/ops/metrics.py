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


def damped_power(stat: torch.Tensor, damping: float, power: float) -> torch.Tensor:
    """``(stat + damping) ** power``: the diagonal metric used by F-LoRSum."""
    return (stat + damping).pow(power)
