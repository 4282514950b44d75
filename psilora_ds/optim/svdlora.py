"""The SVDLoRA oracle as an optimizer: a dense step projected back to rank r by a truncated SVD
(METHOD.md section 5). Forms ``m x n`` matrices: for small layers, tests and benchmarks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import svd_project
from .base import LoRAOptimizer
from .hyperparameters import check

ADAM_EPS = 1e-8  # torch.optim.Adam's default; not a recipe hyperparameter (PoLAR's Adam uses the same)


class DenseOracle(LoRAOptimizer):
    """An oracle that forms each layer's dense ``m x n`` gradient (``local_dense``: this rank's share), so one
    process only."""

    def check_distributor(self, distributor) -> None:
        if distributor.world_size > 1:
            raise ValueError(f"{type(self).__name__} is a dense single-process oracle; use PSILoRA with several ranks")


class SVDLoRA(DenseOracle):
    """``(A, B) <- svd_r(B A - eta' d)``, ``d = beta d + P`` (dense heavy ball, ``beta = momentum``),
    ``eta' = lr / scaling**2``; factors split as ``B = U S^1/2``, ``A = S^1/2 V^T``."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        *,
        momentum: float = 0.0,
        **options: Any,
    ):
        check(momentum=momentum)
        super().__init__(model, dict(lr=lr, momentum=momentum), **options)

    def update_layer(self, layer, state, factors, grad, group):
        A, B = factors
        d = grad.local_dense().mul_(grad.coef)
        if group["momentum"] > 0:
            if "momentum" in state:
                d = state["momentum"].mul_(group["momentum"]).add_(d)
            state["momentum"] = d
        eta = group["lr"] / layer.scaling**2
        T = (B.to(d.dtype) @ A.to(d.dtype)).sub_(d, alpha=eta)
        A_new, B_new = svd_project(T, layer.rank)
        return A_new.to(A.dtype), B_new.to(B.dtype)


class SVDLoRAAdam(DenseOracle):
    """The SVDLoRA oracle with Adam's direction: ``(A, B) <- svd_r(B A - (lr / s) m^ / (sqrt(v^) + eps))``, ``m, v``
    Adam's bias-corrected moments of the effective weight's full gradient ``G = P / s`` (dense ``m x n`` state):
    a full AdamW step (no weight decay) projected back to rank r (METHOD.md section 5). The ceiling of projected dense
    steps whose direction is Adam's, which Scaled PSI-LoRA's Adafactor metric approaches without dense state: a
    diagnostic for the quality map (docs/BENCHMARKS.md), like :class:`SVDLoRA`."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        **options: Any,
    ):
        check(betas=betas)
        super().__init__(model, dict(lr=lr, betas=tuple(betas)), **options)

    def update_layer(self, layer, state, factors, grad, group):
        A, B = factors
        G = grad.local_dense().mul_(grad.coef / layer.scaling)  # dL/dW of W0 + s B A (METHOD.md section 1)
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state.update(step=0, exp_avg=torch.zeros_like(G), exp_avg_sq=torch.zeros_like(G))
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(G, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(G, G, value=1 - beta2)
        step = state["step"]
        denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(ADAM_EPS)
        direction = (state["exp_avg"] / (1 - beta1**step)).div_(denominator)
        # the effective weight moves by -lr * direction, so B A by that over s
        T = (B.to(G.dtype) @ A.to(G.dtype)).sub_(direction, alpha=group["lr"] / layer.scaling)
        A_new, B_new = svd_project(T, layer.rank)
        return A_new.to(A.dtype), B_new.to(B.dtype)
