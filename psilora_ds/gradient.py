"""A layer's gradient w.r.t. ``B A`` as the optimizers see it, whatever holds it: factored rows, a dense fallback
store, host rows (:class:`LayerGradient`) or the cache-free thin products (:class:`ProductGradient`); with a
coefficient (engine averaging, loss scale, clipping) and the reduction over data-parallel ranks.

:class:`FactoredGradient` is the public API both implement: what a method may ask of a layer's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from .capture import LayerBatch
from .products import LayerProducts
from .ops import compute_dtype, frobenius_sq, kfac_sums, sign_probes, sketched_product, thin_product
from .ops.lorsum import Term
from .ops.sketch_svd import GradientSketch
from .ops.rounds import Rounds


@runtime_checkable
class FactoredGradient(Protocol):
    """A layer's full gradient ``P = coef * sum_ranks P_k`` (m x n, w.r.t. ``B A``; ``G = P / scaling`` w.r.t. the
    effective weight) as an operator, never formed where it need not be. The products and statistics are summed over
    the data-parallel ranks, as generators of rounds (:mod:`~psilora_ds.ops.rounds`: each yields a rank-local thin
    matrix and receives its sum over ranks), so that the layers of a step share one collective per round.

    - ``coef``, ``rows`` (rows over all ranks), ``reduce`` (the sum over ranks of what is still rank-local; None when
      nothing is), ``autograd`` (autograd's gradients of the layer's factors, ``(A.grad, B.grad)`` or PoLAR's
      ``(A.grad, S.grad, B.grad)``, when the step may use them, else None; :meth:`factor_gradients`);
    - :meth:`right_product` ``P @ V``, :meth:`left_product` ``U^T @ P``: any ``V``/``U`` on rows; cache-free
      gradients know them only at the probe factors their products were taken at (the step's starting ``A^T``/``B``
      and the momentum's), and say so otherwise;
    - :meth:`norm_sq` ``||P||_F^2``: exact, or the unbiased ``k``-probe Gaussian sketch (METHOD.md section 6);
    - :meth:`kfac_sums`: the K-FAC row statistics;
    - LoRSum's inputs: :meth:`terms` (``scale * P`` as rank-local ``(coef, F, H)`` terms) and :meth:`known_products`
      (``(B^T P, P A^T)`` at the step's factors when known without the terms);
    - :meth:`spectral_sketch`: ``scale * P``'s two-sided sketch when the capture took it for the spectral first step
      (cache-free; None when the rows are there instead);
    - :meth:`two_sided_sketch`: ``(P Omega, Psi P)`` summed over ranks: from the rows at ``probes()``, or the one the
      cache-free hooks took this step (at the same seeded probes).
    """

    coef: float
    rows: int

    def right_product(self, V: torch.Tensor) -> Rounds[torch.Tensor]: ...

    def left_product(self, U: torch.Tensor) -> Rounds[torch.Tensor]: ...

    def norm_sq(self, probes: int, seed: int, row_offset: int = 0) -> Rounds[torch.Tensor]: ...

    def kfac_sums(self) -> Rounds[tuple[torch.Tensor, torch.Tensor]]: ...

    def terms(self, scale: float) -> list[Term]: ...

    def known_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def factor_gradients(self, scale: float) -> tuple[torch.Tensor, ...] | None: ...

    def spectral_sketch(self, scale: float) -> GradientSketch | None: ...

    def two_sided_sketch(self, probes: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Rounds[GradientSketch]: ...


def scaled_autograd(autograd: tuple[torch.Tensor, ...] | None, c: float) -> tuple[torch.Tensor, ...] | None:
    """Autograd's factor gradients times ``c`` (None stays None)."""
    return None if autograd is None else tuple(g * c for g in autograd)


def autograd_factor_gradients(grad: Any, scale: float) -> tuple[torch.Tensor, ...] | None:
    """Autograd's gradients of a layer's factors (``grad.autograd``, or None) for ``G = scale * P``: they carry the
    coefficient the gradient had when built (``grad.autograd_coef``), before clipping changed ``grad.coef``."""
    return scaled_autograd(grad.autograd, scale * grad.coef * (1.0 / grad.autograd_coef))


class LayerGradient:
    """``P = coef * sum_ranks (Z_k^T X_k + P_k)``: this rank's cached rows ``X`` (N_k x n), ``Z``
    (N_k x m) and dense store ``P_k`` (or None); ``reduce`` sums over ranks (None: one process);
    ``rows`` counts the rows of all ranks."""

    def __init__(self, batch: LayerBatch, coef: float, rows: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                 autograd: tuple[torch.Tensor, ...] | None = None):
        self.batch = batch
        self.dense = batch.dense
        self.host = batch.host  # micro-batches in host memory (cache_offload), read back one at a time
        self.coef = coef
        self.rows = rows
        self.reduce = reduce
        # autograd's (A.grad, B.grad): the engine's gradient (B^T P, P A^T) for the unclipped P, i.e. ``coef`` as given
        # here times the products of the summed rows; or None
        self.autograd = autograd
        self.autograd_coef = coef  # (coef may then change: clipping)

    def known_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B^T G, G A^T)`` for ``G = scale * P`` from autograd's LoRA gradients, when usable (factors (A, B))."""
        return self.factor_gradients(scale)

    def factor_gradients(self, scale: float) -> tuple[torch.Tensor, ...] | None:
        """Autograd's gradients of the layer's factors for ``G = scale * P`` when the step takes them (the chain rule
        of :func:`~psilora_ds.ops.factor_gradients`), else None."""
        return autograd_factor_gradients(self, scale)

    def known_momentum_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(M_B^T G, G M_A^T)`` when known without the rows (never, here: see :class:`ProductGradient`)."""
        return None

    def spectral_sketch(self, scale: float) -> GradientSketch | None:
        """None: the rows are here, so the spectral first step iterates on them (exact)."""
        return None

    def two_sided_sketch(self, probes: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Rounds[GradientSketch]:
        """``(P Omega, Psi P)`` from the rows at ``(Omega, Psi) = probes()``, summed over ranks (two rounds)."""
        omega, psi = probes()
        Y = yield from self.right_product(omega)
        W = yield from self.left_product(psi.T)
        return GradientSketch(Y, W, omega, psi)

    def terms(self, scale: float) -> list[Term]:
        """``scale * P`` as LoRSum terms (rank-local, summed by ``reduce``)."""
        # one term per micro-batch: the rows are never concatenated (that would double the cache for the step)
        out: list[Term] = [(scale * self.coef, z.T, x) for x, z in zip(self.batch.xs, self.batch.zs)]
        if self.dense is not None:
            out.append((scale * self.coef, self.dense, None))
        out += [(scale * self.coef, h, None) for h in self.host]
        return out

    @property
    def X(self) -> torch.Tensor:
        """The device rows concatenated (a copy when there are several micro-batches: for statistics taken
        one layer at a time, never held for the step)."""
        return self.batch.X()

    @property
    def Z(self) -> torch.Tensor:
        return self.batch.Z()

    @property
    def row_dtype(self) -> torch.dtype:
        b = self.batch
        return b.xs[0].dtype if b.xs else b.host[0].X.dtype if b.host else b.dense.dtype

    @property
    def device(self) -> torch.device:
        """Where the rows are used (the host rows' device of origin)."""
        b = self.batch
        return b.xs[0].device if b.xs else b.host[0].device if b.host else b.dense.device

    def sketch(self, omega: torch.Tensor) -> torch.Tensor:
        """``P_k Omega`` (m x k) of this rank's share, micro-batch by micro-batch (METHOD.md section 6)."""
        parts = [sketched_product(z, x, omega) for x, z in self.batch.row_pairs()]
        if self.dense is not None:
            parts.append(self.dense.to(omega.dtype) @ omega)
        return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]

    @property
    def dense_for_quadratics(self) -> bool:
        """Whether statistics quadratic in ``P`` (the exact norm, Shampoo diagonals) form this rank's ``P``
        densely, one layer at a time (:meth:`local_dense`, micro-batch by micro-batch) rather than take the
        Gram route on the concatenated rows: when the rows are not all on the device (a dense store, host
        rows), or when there are several micro-batches and ``P`` is the smaller (``N (m + n) > m n``: their
        concatenation would be a copy larger than ``P``, and the Gram route costs more too)."""
        b = self.batch
        if self.dense is not None or self.host:
            return True
        rows = sum(x.shape[0] for x in b.xs)
        m, n = b.zs[0].shape[1], b.xs[0].shape[1]
        return len(b.xs) > 1 and rows * (m + n) > m * n

    def local_dense(self) -> torch.Tensor:
        """This rank's ``Z^T X + P_k`` (and host rows) formed densely (for the oracle and dense statistics)."""
        return self.batch.P()

    def right_product(self, V: torch.Tensor) -> Rounds[torch.Tensor]:
        """``P @ V`` (m x k), summed over ranks."""
        out = sum(self._local_products(
            lambda F, H: F @ V.to(F.dtype) if H is None else thin_product(F, H @ V.to(F.dtype))))
        return (yield from self._reduced(out * self.coef))

    def left_product(self, U: torch.Tensor) -> Rounds[torch.Tensor]:
        """``U^T @ P`` (k x n), summed over ranks."""
        out = sum(self._local_products(lambda F, H: U.to(F.dtype).T @ F if H is None else (U.to(F.dtype).T @ F) @ H))
        return (yield from self._reduced(out * self.coef))

    def _local_products(self, product: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]):
        """``product(F, H)`` of each of this rank's terms ``F H`` (``H`` None: a dense ``F``), in the compute dtype."""
        for _, F, H in self.terms(1.0):
            F, H = F.fetch() if hasattr(F, "fetch") else (F, H)
            cd = compute_dtype(F.dtype)
            yield product(F.to(cd), None if H is None else H.to(cd))

    def _reduced(self, t: torch.Tensor) -> Rounds[torch.Tensor]:
        if self.reduce is not None:
            t = yield t
        return t

    def norm_sq(self, probes: int, seed: int, row_offset: int = 0) -> Rounds[torch.Tensor]:
        """``||P||_F^2`` summed over ranks. ``probes == 0``: exact (one process only: the Gram trick on the rows, or
        ``P`` formed one layer at a time where that is cheaper). ``probes = k > 0``: with ``Omega`` (n x k) random
        signs, the rows from ``row_offset`` on of those of ``seed`` (shared by the ranks), ``E ||P Omega||_F^2 / k =
        ||P||_F^2``; ``P Omega = sum_ranks Z_k^T (X_k Omega) (+ P_k Omega)`` costs one ``m x k`` all-reduce and no
        activation moves; its relative standard deviation is at most ``sqrt(2 sum s_i^4 / k) / sum s_i^2 <= sqrt(2 /
        k)`` (s_i: singular values of P)."""
        if probes == 0:
            if self.dense_for_quadratics:
                return self.local_dense().square().sum() * self.coef**2
            return frobenius_sq(self.Z, self.X) * self.coef**2
        n = self.batch.xs[0].shape[1] if self.batch.xs else self.local_n()
        omega = sign_probes(n, probes, seed, device=self.device, row_offset=row_offset,
                            dtype=torch.float64 if self.row_dtype == torch.float64 else torch.float32)
        Y = yield from self._reduced(self.sketch(omega))
        return Y.square().sum() * (self.coef**2 / probes)

    def local_n(self) -> int:
        """``n``, the layer's input features, from whatever this rank holds."""
        b = self.batch
        return b.host[0].X.shape[1] if b.host else b.dense.shape[1]

    def kfac_sums(self) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
        """``(sum over all rows of x**2, sum over all rows of (coef z)**2)``, summed over ranks (rounds:
        :mod:`~psilora_ds.ops.rounds`)."""
        sum_x2, sum_z2 = self.local_kfac_sums()
        n = sum_x2.shape[0]
        both = torch.cat([sum_x2, sum_z2])
        if self.reduce is not None:
            both = yield both
        return both[:n], both[n:]

    def local_kfac_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of :meth:`kfac_sums`."""
        b = self.batch
        parts = [kfac_sums(x, z) for x, z in self.batch.row_pairs()]
        if self.dense is not None:
            parts.append((b.folded_x2, b.folded_z2))
        sum_x2, sum_z2 = (torch.stack(t).sum(0) if len(t) > 1 else t[0] for t in zip(*parts))
        return sum_x2, sum_z2 * self.coef**2


class ProductGradient:
    """``P = coef * sum_ranks P_k`` known only through its thin products at the step's probe factors (cache-free
    Jacobi steps, METHOD.md section 6): ``products`` already summed over ranks, taken at ``probes = (left, right)``
    (:class:`~psilora_ds.products.ProbeFactors`: ``left = [B, M_B]``, ``right = [A; M_A]``); ``r`` the
    LoRA rank (the first ``r`` probe factors are ``(A, B)``, the rest the momentum's).

    ``autograd``: autograd's ``(A.grad, B.grad)``, the engine's gradient ``(B^T P, P A^T) / coef`` at construction
    (reduced over ranks by the engine), standing for the products at ``(A, B)``, which ``products`` then leaves out
    (it holds the momentum factors' only).

    A stack of layers stepped together (:mod:`~psilora_ds.optim.layer_stacks`) is one such gradient with every tensor
    stacked along a leading dimension and no ``probes``."""

    def __init__(self, products: LayerProducts, r: int, coef: float, rows: int,
                 probes: tuple[torch.Tensor, torch.Tensor] | None, sketch: GradientSketch | None = None,
                 autograd: tuple[torch.Tensor, ...] | None = None):
        self.products = products
        self.r = r
        self.coef = coef
        self.rows = rows
        self.probes = probes
        self.sketch = sketch  # the spectral first step's, summed over ranks (None: not taken this step)
        self.reduce = None  # (already summed over ranks)
        self.autograd = autograd
        self.autograd_coef = coef  # autograd's gradients are coef * the summed products (before clipping)
        self._offset = 0 if autograd is not None else r  # where the momentum factors' products start

    def spectral_sketch(self, scale: float) -> GradientSketch | None:
        return None if self.sketch is None else self.sketch.scaled(scale * self.coef)

    def two_sided_sketch(self, probes: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Rounds[GradientSketch]:
        """The sketch the hooks took this step (its probes are ``probes()``'s: the same seed), already summed."""
        if self.sketch is None:
            raise RuntimeError("the cache-free capture took no two-sided sketch this step (the optimizer's "
                               "hook_statistics said no)")
        return self.sketch.scaled(self.coef)
        yield  # (a generator of rounds, with none)

    def terms(self, scale: float) -> list[Term]:
        return []

    def factor_gradients(self, scale: float) -> tuple[torch.Tensor, ...] | None:
        """As :meth:`LayerGradient.factor_gradients`."""
        return autograd_factor_gradients(self, scale)

    def known_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.autograd is not None:
            return self._lora_autograd(scale)
        p, c = self.products, scale * self.coef
        return p.left[..., : self.r, :] * c, p.right[..., : self.r] * c

    def known_momentum_products(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        p, c, k = self.products, scale * self.coef, self._offset
        return p.left[..., k:, :] * c, p.right[..., k:] * c

    def _probe(self, side: int) -> torch.Tensor:
        if self.probes is None:
            raise RuntimeError("a stacked cache-free gradient knows its products through known_products and "
                               "known_momentum_products only (a method that asks for them by factor does not stack: "
                               "its steps_stacked is False)")
        return self.probes[side]

    def _probe_block(self, M: torch.Tensor, probe: torch.Tensor, what: str) -> slice:
        """The block of probe factors equal to ``M`` (columns), or a one-line error: products at other factors
        need the rows."""
        for block in (slice(0, self.r), slice(self.r, probe.shape[-1])):
            part = probe[:, block]
            if part.shape == M.shape and torch.equal(part, M.to(part.dtype)):
                return block
        raise ValueError(f"a cache-free gradient knows {what} only at the factors its products were taken at (the "
                         "step's A, B and momentum factors); other products need the rows (cache_free=False)")

    def _lora_autograd(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B^T G, G A^T)`` from autograd's gradients of factors ``(A, B)`` (a core's gradients are not these)."""
        if len(self.autograd) != 2:
            raise RuntimeError("autograd's gradients of factors with a core (A, S, B) are not the products at (A, B): "
                               "the method reads them through factor_gradients")
        return self.factor_gradients(scale)

    def _taken(self, block: slice) -> slice | None:
        """Where the products of probe block ``block`` are in :attr:`products` (None: autograd's gradients)."""
        if block.start == 0 and self.autograd is not None:
            return None
        shift = self.r - self._offset  # r when the products at (A, B) were left out: the momentum's then start at 0
        return slice(block.start - shift, block.stop - shift)

    def right_product(self, V: torch.Tensor) -> Rounds[torch.Tensor]:
        """``P @ V`` for ``V`` = the step's ``A^T`` or ``M_A^T`` (already summed: no round)."""
        taken = self._taken(self._probe_block(V, self._probe(1).T, "P @ V"))
        if taken is None:
            return self._lora_autograd(1.0)[1]
        return self.products.right[:, taken] * self.coef
        yield  # (a generator of rounds, with none)

    def left_product(self, U: torch.Tensor) -> Rounds[torch.Tensor]:
        """``U^T @ P`` for ``U`` = the step's ``B`` or ``M_B`` (already summed: no round)."""
        taken = self._taken(self._probe_block(U, self._probe(0), "U^T @ P"))
        if taken is None:
            return self._lora_autograd(1.0)[0]
        return self.products.left[taken] * self.coef
        yield

    def kfac_sums(self) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
        if self.products.sum_x2 is None:
            raise RuntimeError("the cache-free capture took no K-FAC row sums this step (the optimizer's "
                               "hook_statistics said no)")
        return self.products.sum_x2, self.products.sum_z2 * self.coef**2
        yield  # (already summed over ranks: no round)

    def norm_sq(self, probes: int, seed: int, row_offset: int = 0) -> Rounds[torch.Tensor]:
        """``||P Omega||_F^2 / k``, the unbiased estimate of ``||P||_F^2`` from the sketch the hooks took (the
        probes and seed are the capture's: an exact norm needs the rows)."""
        sketch = self.products.sketch
        if sketch is None:
            raise RuntimeError("cache-free products were taken without the clipping norm's sketch")
        return sketch.square().sum() * (self.coef**2 / sketch.shape[1])
        yield

    def local_dense(self) -> torch.Tensor:
        raise RuntimeError("a cache-free gradient has no rows to form P from (build the optimizer with "
                           "cache_free=False)")
