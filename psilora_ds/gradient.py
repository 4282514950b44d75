"""A layer's gradient w.r.t. ``B A`` as the optimizers see it: factored rows, a dense fallback store,
a coefficient (engine averaging, loss scale, clipping) and the reduction over data-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .capture import LayerBatch
from .products import LayerProducts
from .ops import kfac_sums
from .ops.lorsum import Term
from .ops.rounds import Rounds


class LayerGradient:
    """``P = coef * sum_ranks (Z_k^T X_k + P_k)``: this rank's cached rows ``X`` (N_k x n), ``Z``
    (N_k x m) and dense store ``P_k`` (or None); ``reduce`` sums over ranks (None: one process);
    ``rows`` counts the rows of all ranks."""

    def __init__(self, batch: LayerBatch, coef: float, rows: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                 autograd: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.batch = batch
        self.X, self.Z = batch.X(), batch.Z()
        self.dense = batch.dense
        self.coef = coef
        self.rows = rows
        self.reduce = reduce
        # autograd's (A.grad, B.grad) = (B^T P, P A^T) for the unclipped P (coef = clip here), or None
        self.autograd = autograd

    def known_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B^T G, G A^T)`` for ``G = scale * P`` from autograd's LoRA gradients, when usable."""
        if self.autograd is None:
            return None
        return self.autograd[0] * (scale * self.coef), self.autograd[1] * (scale * self.coef)

    def known_momentum_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(M_B^T G, G M_A^T)`` when known without the rows (never, here: see :class:`ProductGradient`)."""
        return None

    def terms(self, scale: float) -> list[Term]:
        """``scale * P`` as LoRSum terms (rank-local, summed by ``reduce``)."""
        out: list[Term] = [(scale * self.coef, self.Z.T, self.X)]
        if self.dense is not None:
            out.append((scale * self.coef, self.dense, None))
        return out

    def local_dense(self) -> torch.Tensor:
        """This rank's ``Z^T X + P_k`` formed densely (for the oracle and dense statistics)."""
        return self.batch.P()

    def kfac_sums(self) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
        """``(sum over all rows of x**2, sum over all rows of (coef z)**2)``, summed over ranks (rounds:
        :mod:`~psilora_ds.ops.rounds`)."""
        sum_x2, sum_z2 = kfac_sums(self.X, self.Z)
        if self.dense is not None:
            sum_x2, sum_z2 = sum_x2 + self.batch.folded_x2, sum_z2 + self.batch.folded_z2
        both = torch.cat([sum_x2, sum_z2 * self.coef**2])
        if self.reduce is not None:
            both = yield both
        n = self.X.shape[1]
        return both[:n], both[n:]


class ProductGradient:
    """``P = coef * sum_ranks P_k`` known only through its thin products at the step's starting factors
    (cache-free Jacobi steps, METHOD.md section 6): ``products`` already summed over ranks, ``r`` the
    LoRA rank (the first ``r`` probe factors are ``(A, B)``, the rest the momentum's)."""

    X = Z = dense = autograd = reduce = None  # no rows, no dense store, nothing left to reduce

    def __init__(self, products: LayerProducts, r: int, coef: float, rows: int):
        self.products = products
        self.r = r
        self.coef = coef
        self.rows = rows

    def terms(self, scale: float) -> list[Term]:
        return []

    def known_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        p, c = self.products, scale * self.coef
        return p.left[: self.r] * c, p.right[:, : self.r] * c

    def known_momentum_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        p, c = self.products, scale * self.coef
        return p.left[self.r:] * c, p.right[:, self.r:] * c

    def kfac_sums(self) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
        return self.products.sum_x2, self.products.sum_z2 * self.coef**2
        yield  # (already summed over ranks: no round)

    def sketched_norm_sq(self) -> torch.Tensor:
        """``||P Omega||_F^2 / k``: the unbiased estimate of ``||P||_F^2``."""
        sketch = self.products.sketch
        if sketch is None:
            raise RuntimeError("cache-free products were taken without the clipping norm's sketch")
        return sketch.square().sum() * (self.coef**2 / sketch.shape[1])

    def local_dense(self) -> torch.Tensor:
        raise RuntimeError("a cache-free gradient has no rows to form P from (build the optimizer with "
                           "cache_free=False)")
