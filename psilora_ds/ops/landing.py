"""The landing field on the Stiefel manifold (Ablin and Peyre 2022), PoLAR's update of its direction factors
(arXiv 2506.03133; docs/METHOD.md, PoLAR): a field whose flow decreases the loss and attracts to the manifold, with no
retraction, computed in O(n r^2) from two r x r Grams (never the n x n skew matrix)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .rounds import Rounds


def landing_field(X: torch.Tensor, D: torch.Tensor, lam: float) -> torch.Tensor:
    """``Lambda = (D X^T - X D^T) X + lam X (X^T X - I)`` for a tall ``X`` (n x r, near-orthonormal columns) with
    Euclidean gradient ``D`` (n x r): the relative gradient's skew part (without the 1/2) plus ``lam`` times the
    gradient of the distance to the manifold ``||X^T X - I||^2 / 4``. Formed as ``D (X^T X) - X (D^T X) +
    lam (X (X^T X) - X)``."""
    XtX, DtX = X.mT @ X, D.mT @ X  # (a stack of layers' factors: each its own)
    return D @ XtX - X @ DtX + lam * (X @ XtX - X)


def landing_field_rounds(X: torch.Tensor, D: torch.Tensor, lam: float,
                         reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> Rounds[torch.Tensor]:
    """:func:`landing_field` where the rows of ``X`` and ``D`` are sharded over ranks: the field is row-wise given the
    two r x r Grams, so each rank sums its rows' ``X^T X`` and ``D^T X`` and one round (``reduce``) sums them; the
    field of this rank's rows is returned (:mod:`~psilora_ds.ops.rounds`)."""
    r = X.shape[1]
    grams = torch.cat([X.T @ X, D.T @ X])
    if reduce is not None:
        grams = yield grams
    XtX, DtX = grams[:r], grams[r:]
    return D @ XtX - X @ DtX + lam * (X @ XtX - X)
