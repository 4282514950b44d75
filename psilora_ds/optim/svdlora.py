"""The SVDLoRA oracle as an optimizer: a dense step projected back to rank r by a truncated SVD
(METHOD.md section 5). Forms ``m x n`` matrices: for small layers, tests and benchmarks."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..ops import svd_project
from .base import LoRAOptimizer
from .hyperparameters import check


class SVDLoRA(LoRAOptimizer):
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

    def check_distributor(self, distributor) -> None:
        if distributor.world_size > 1:
            raise ValueError("SVDLoRA is a dense single-process oracle; use PSILoRA with several ranks")

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
