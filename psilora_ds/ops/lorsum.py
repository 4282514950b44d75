"""LoRSum and F-LoRSum: the best (proximal) rank-r approximation of a sum of low-rank
terms, by warm-started alternating least squares on thin matrices (METHOD.md sections 2, 4).

Every input may carry one leading dimension: a stack of ``L`` layers of equal shapes stepped together (one batched
matrix product per operation instead of ``L``; :mod:`~psilora_ds.optim.layer_stacks`), each matrix as on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .linalg import SPDSolve, compute_dtype, thin_product
from .rounds import Rounds, run_rounds


class Fetched(Protocol):
    """A term ``F H`` kept elsewhere (host memory) and read back for each product, so that only one such
    term is on the device at a time: ``fetch()`` returns ``(F, H)`` on the device."""

    def fetch(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class StackedTerms:
    """Each layer's terms of a stack of layers stepped together, standing for one term ``F H`` of the stack:
    ``members[j]`` holds the ``(F, H)`` pairs of layer ``j`` (``H`` None: a dense ``F``; ``F`` may be
    :class:`Fetched`), which may differ from layer to layer in number and kind (micro-batches, a dense store, host
    rows): the products are taken layer by layer, summed over the layer's pairs and stacked (``m x n`` layers)."""

    def __init__(self, members: Sequence[Sequence[tuple["torch.Tensor | Fetched", "torch.Tensor | None"]]],
                 m: int, n: int):
        self.members, self.m, self.n = [list(pairs) for pairs in members], m, n


Term = tuple[float, "torch.Tensor | Fetched | StackedTerms", "torch.Tensor | None"]


def _a_part(Bt: torch.Tensor, F: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    return Bt.mT @ F if H is None else (Bt.mT @ F) @ H


def _b_part(At: torch.Tensor, F: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    return F @ At.mT if H is None else thin_product(F, H @ At.mT)


class _PreparedTerm:
    """One term ``coef * F @ H`` (or a dense ``coef * F`` when ``H is None``; or :class:`StackedTerms`). The products
    LoRSum needs are ``Bt^T F H D_in^-1`` and ``D_out^-1 F H At^T``: the diagonal metrics scale the thin ``r x n`` and
    ``m x r`` results, and ``F``, ``H`` are taken to the compute dtype inside each product, so that nothing the size
    of the rows is kept beside them for the step (the cache is the memory wall, METHOD.md section 6). A
    :class:`Fetched` term is read back at each product."""

    def __init__(self, coef, F, H, d_out, d_in, cd):
        self.coef, self.F, self.H, self.d_out, self.d_in, self.cd = float(coef), F, H, d_out, d_in, cd

    def _parts(self, F, H) -> tuple[torch.Tensor, torch.Tensor | None]:
        F, H = F.fetch() if hasattr(F, "fetch") else (F, H)
        return F.to(self.cd), None if H is None else H.to(self.cd)

    def _products(self, part, X: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``part(X, F, H)`` of this term; of a stack, each layer's summed over its pairs, stacked."""
        if not isinstance(self.F, StackedTerms):
            return part(X, *self._parts(self.F, self.H))
        out = []
        for j, pairs in enumerate(self.F.members):
            total = None
            for F, H in pairs:
                p = part(X[j], *self._parts(F, H))
                total = p if total is None else total.add_(p)
            out.append(torch.zeros(shape, dtype=self.cd, device=X.device) if total is None else total)
        return torch.stack(out)

    def a_product(self, Bt: torch.Tensor) -> torch.Tensor:
        """``Bt^T F H D_in^-1`` (r x n; ``(L, r, n)`` for a stack)."""
        n = self.F.n if isinstance(self.F, StackedTerms) else 0
        out = self._products(_a_part, Bt, (Bt.shape[-1], n))
        return out if self.d_in is None else out.div_(self.d_in[..., None, :])

    def b_product(self, At: torch.Tensor) -> torch.Tensor:
        """``D_out^-1 F H At^T`` (m x r; ``(L, m, r)`` for a stack)."""
        m = self.F.m if isinstance(self.F, StackedTerms) else 0
        out = self._products(_b_part, At, (m, At.shape[-2]))
        return out if self.d_out is None else out.div_(self.d_out[..., :, None])


def add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """``out += alpha * a @ b`` in place, for one matrix (``addmm_``) or a stack of them (``baddbmm_``)."""
    return out.addmm_(a, b, alpha=alpha) if out.dim() == 2 else out.baddbmm_(a, b, alpha=alpha)


def lorsum(*args, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lorsum_rounds` run on its own: each thin product summed over ranks by its own ``reduce`` call."""
    return run_rounds(lorsum_rounds(*args, reduce=reduce, **kwargs), reduce)


def lorsum_rounds(
    A: torch.Tensor,
    B: torch.Tensor,
    terms: Sequence[Term],
    *,
    lam: float | torch.Tensor,
    iters: int,
    c0: float = 1.0,
    d_out: torch.Tensor | None = None,
    d_in: torch.Tensor | None = None,
    shared_terms: Sequence[Term] = (),
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    known_products: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
    """Approximate the best rank-r factorization ``B' A'`` of ``T = c0*B@A + sum_j coef_j*F_j@H_j``.

    Minimizes ``1/2 ||B'A' - T||_F^2 + lam/2 (||A'-A||_F^2 + ||B'-B||_F^2)`` by ALS warm-started
    and anchored at ``(A, B)``, never forming an ``m x n`` matrix.

    Args:
        A: ``r x n`` (``lora_A.weight``).
        B: ``m x r`` (``lora_B.weight``).
        terms: ``(coef, F, H)`` with ``F`` ``m x k`` and ``H`` ``k x n``. For captured gradient
            factors ``P = Z^T X`` pass ``F = Z.T``, ``H = X``; micro-batches may be separate terms.
            ``(coef, P, None)`` is a dense ``m x n`` term (the exact fallback store of METHOD.md 6), and
            ``(coef, source, None)`` with a :class:`Fetched` source a term read back for each product.
        lam: proximal weight (> 0); a tensor when it is computed on the device (never read back): 0-dim, or one per
            matrix of a stack, shaped ``(L, 1, 1)``.
        iters: ``0`` = Jacobi (both half-steps use the old factors: preconditioned LoRA);
            ``K >= 1`` = K alternating (Gauss-Seidel) iterations, a block power method that
            converges to the truncated SVD of ``T`` as K grows.
        c0: coefficient of the current product ``B @ A`` in the target.
        d_out, d_in: optional positive diagonal metrics (``m``,) and (``n``,). When given, this is
            F-LoRSum: the metric-weighted projection of ``T~ = c0 BA + sum coef D_out^-1 F H D_in^-1``
            (METHOD.md section 4).
        shared_terms: more ``(coef, F, H)`` terms that are identical on every data-parallel rank
            (e.g. the low-rank momentum); never reduced.
        reduce: data parallelism (METHOD.md section 6): ``terms`` hold this rank's share of the
            data, and each thin product (``r x n`` or ``m x r``, twice per iteration) is summed over the
            ranks: this generator yields it and receives the sum (:mod:`~psilora_ds.ops.rounds`; with
            :func:`lorsum`, ``reduce`` is called on it). ``None``: one process. Whatever ``reduce``, the
            generator also yields its r x r systems (:class:`~psilora_ds.ops.linalg.SPDSolve`), which the
            driver solves batched with every other layer's of the same round.
        known_products: ``(B^T G, G A^T)`` for ``G = sum_j coef_j F_j H_j`` over ``terms`` (summed over
            ranks), when the caller already has them: with ``G = -eta P`` they are ``-eta`` times
            autograd's LoRA gradients ``A.grad``, ``B.grad`` (METHOD.md section 6). Used for the
            products at the starting factors (the first A-step, and the Jacobi B-step) instead of
            computing and reducing them.

    Returns:
        ``(A_new, B_new)`` in the dtype of ``A`` and ``B``. The math runs in float32 or wider.
    """
    if iters < 0:
        raise ValueError(f"lorsum: iters must be >= 0, got {iters}")
    if not isinstance(lam, torch.Tensor) and lam <= 0:
        raise ValueError(f"lorsum: lam must be > 0, got {lam}")
    if (d_out is None) != (d_in is None):
        raise ValueError("lorsum: pass both d_out and d_in (F-LoRSum) or neither")
    out_dtype = A.dtype
    cd = compute_dtype(A.dtype)
    A0 = A.to(cd)
    B0 = B.to(cd)
    r = A0.shape[-2]
    eye = torch.eye(r, dtype=cd, device=A0.device)

    if d_out is not None:
        d_out, d_in = d_out.to(cd), d_in.to(cd)
    local = [_PreparedTerm(c, F, H, d_out, d_in, cd) for c, F, H in terms]
    shared = [_PreparedTerm(c, F, H, d_out, d_in, cd) for c, F, H in shared_terms]

    if isinstance(lam, torch.Tensor):
        lam = lam.to(cd)

    def add_prox(data: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:  # data += lam * anchor
        return data.add_(anchor * lam) if isinstance(lam, torch.Tensor) else data.add_(anchor, alpha=lam)

    def summed(like: torch.Tensor, parts) -> torch.Tensor:
        out = None
        for c, part in parts:
            out = part.mul_(c) if out is None else out.add_(part, alpha=c)  # parts are fresh products
        return torch.zeros_like(like) if out is None else out

    def a_step(Bt: torch.Tensor) -> Rounds[torch.Tensor]:
        # (Bt^T D_out Bt + lam I) A+ = lam A + c0 (Bt^T D_out B) A + sum c_j (Bt^T F_j)(H_j D_in^-1)
        if known_products is not None and Bt is B0:
            data = known_products[0].to(cd, copy=True)
            data = data if d_in is None else data.div_(d_in[..., None, :])
        else:
            data = summed(A0, ((t.coef, t.a_product(Bt)) for t in local))
            if reduce is not None:
                data = yield data
        for t in shared:
            data.add_(t.a_product(Bt), alpha=t.coef)
        DBt = Bt if d_out is None else d_out[..., :, None] * Bt
        gram = DBt.mT @ Bt
        cross = gram if Bt is B0 else DBt.mT @ B0
        add_product_(add_prox(data, A0), cross, A0, alpha=c0)
        return (yield SPDSolve(gram + lam * eye, data, "left"))  # batched with the other layers' systems

    def b_step(At: torch.Tensor) -> Rounds[torch.Tensor]:
        # B+ (At D_in At^T + lam I) = lam B + c0 B (A D_in At^T) + sum c_j (D_out^-1 F_j)(H_j At^T)
        if known_products is not None and At is A0:
            data = known_products[1].to(cd, copy=True)
            data = data if d_out is None else data.div_(d_out[..., :, None])
        else:
            data = summed(B0, ((t.coef, t.b_product(At)) for t in local))
            if reduce is not None:
                data = yield data
        for t in shared:
            data.add_(t.b_product(At), alpha=t.coef)
        DAt = At if d_in is None else At * d_in[..., None, :]
        gram = DAt @ At.mT
        cross = gram if At is A0 else A0 @ DAt.mT
        add_product_(add_prox(data, B0), B0, cross, alpha=c0)
        return (yield SPDSolve(gram + lam * eye, data, "right"))

    if iters == 0:
        A_new = yield from a_step(B0)
        B_new = yield from b_step(A0)
    else:
        Bt = B0
        for _ in range(iters):
            A_new = yield from a_step(Bt)
            Bt = yield from b_step(A_new)
        B_new = Bt
    return A_new.to(out_dtype).contiguous(), B_new.to(out_dtype).contiguous()
