"""PoLAR (arXiv 2506.03133): polar-decomposed adapters ``Delta W = s B S A`` trained with the landing update
(docs/METHOD.md section 7): Adam on the landing fields of the direction factors, AdamW on the core."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import adam_step, compute_dtype, factor_gradients, landing_field
from .base import LoRAOptimizer
from .hyperparameters import check

ADAM_EPS = 1e-8
FACTOR_NAMES = ("A", "S", "B")


class PoLAR(LoRAOptimizer):
    """The PoLAR optimizer over a model whose adapters are :class:`~psilora_ds.polar_adapter.PolarLinear` layers
    (:func:`~psilora_ds.polar_adapter.polar_config`).

    Per step and layer, from the layer's full gradient ``P`` (w.r.t. the product ``B S A``) through two thin products
    summed over ranks (``P A^T``, ``B^T P``): the Euclidean gradients ``D_B = P A^T S^T``, ``D_A = S^T B^T P``,
    ``D_S = B^T P A^T`` (which are autograd's ``B.grad``, ``A.grad``, ``S.grad``: taken instead, in one process and
    under DDP, once the first step has checked them); the landing fields of ``B`` and of ``A^T``
    (:func:`~psilora_ds.ops.landing_field`, no retraction); AdamW along the fields and along ``D_S``, weight decay on
    ``S`` only. Every rank computes every
    layer's update from the reduced products, as the other methods do; clipping scales ``P`` by the full gradient
    norm as for them.

    Args:
        model: a peft model with PoLAR adapters.
        lr: Adam's step (the authors' LLaMA-2-7B runs: 4e-3, against 4e-4 for LoRA).
        betas: Adam's.
        polar_lam: the landing field's attraction to the manifold (the authors' code: 1.0; their LLaMA-2-7B
            scripts: 5e-3).
        polar_core: ``"full"`` r x r core, or ``"diag"``: its gradient kept on the diagonal (from ``S = 0`` the core
            stays diagonal: Adam moves no entry whose gradient was always 0).
        weight_decay: AdamW's decoupled decay of the core ``S``.
        **options: the family's shared options (:class:`~psilora_ds.optim.options.LoRAOptions`).
    """

    polar_adapter = True

    def __init__(self, model: nn.Module, lr: float = 4e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 polar_lam: float = 1.0, polar_core: str = "full", weight_decay: float = 0.0, **options: Any):
        check(betas=betas, polar_lam=polar_lam, polar_core=polar_core, weight_decay=weight_decay)
        super().__init__(model, dict(lr=lr, betas=tuple(betas), polar_lam=polar_lam, polar_core=polar_core,
                                     weight_decay=weight_decay), **options)

    def layer_factors(self, layer) -> tuple[nn.Parameter, ...]:
        return layer.A, layer.S, layer.B

    def cache_free_blocker(self, group) -> str | None:
        return None  # its step needs only the products at (A, B): cache-free by default (METHOD.md section 7)

    def steps_stacked(self, group) -> bool:
        return self.cache_free  # (on rows its products are taken by factor, layer by layer)

    def init_state(self, layer, group) -> dict[str, Any]:
        dtype = compute_dtype(layer.lora_A.weight.dtype)
        device = layer.A.device
        r, m, n = layer.rank, layer.out_features, layer.in_features
        shapes = {"A": (r, n), "S": (r, r), "B": (m, r)}
        state: dict[str, Any] = {"step": 0}
        for name, shape in shapes.items():
            state[f"exp_avg_{name}"] = torch.zeros(shape, dtype=dtype, device=device)
            state[f"exp_avg_sq_{name}"] = torch.zeros(shape, dtype=dtype, device=device)
        return state

    def update_layer(self, layer, state, factors, grad, group):
        cd = compute_dtype(factors[0].dtype)
        A, S, B = (f.to(cd) for f in factors)
        euclidean = grad.factor_gradients(1.0)  # autograd's A.grad, S.grad, B.grad where the step takes them
        if euclidean is None:
            known = grad.known_products(1.0)  # cache-free: the hooks' (B^T P, P A^T), summed over ranks
            if known is None:  # on rows
                PAt = yield from grad.right_product(A.T)  # P A^T (m x r), summed over ranks
                BtP = yield from grad.left_product(B)  # B^T P (r x n)
            else:
                BtP, PAt = known
            euclidean = factor_gradients((A, S, B), BtP, PAt)
        D_A, D_S, D_B = (d.to(cd) for d in euclidean)
        lam = group["polar_lam"]
        # (.mT, and the core's diagonal over the last two dimensions: a stack of layers steps as one)
        directions = {"A": landing_field(A.mT, D_A.mT, lam).mT,
                      "S": torch.diag_embed(D_S.diagonal(dim1=-2, dim2=-1)) if group["polar_core"] == "diag" else D_S,
                      "B": landing_field(B, D_B, lam)}
        state["step"] += 1
        new = []
        for name, x in zip(FACTOR_NAMES, (A, S, B)):
            new.append(adam_step(x, directions[name], state[f"exp_avg_{name}"], state[f"exp_avg_sq_{name}"],
                                 state["step"], lr=group["lr"], betas=group["betas"], eps=ADAM_EPS,
                                 weight_decay=group["weight_decay"] if name == "S" else 0.0))
        return tuple(x.to(f.dtype) for x, f in zip(new, factors))
