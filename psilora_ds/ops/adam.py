"""Adam's update of one tensor from a given direction (torch.optim.AdamW's formula, decoupled weight decay): PoLAR
steps its factors with Adam on the landing field instead of the gradient (docs/METHOD.md section 7)."""

from __future__ import annotations

import torch


def adam_step(x: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, *,
              lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0) -> torch.Tensor:
    """The new ``x`` after one AdamW step along ``g`` (``step``: 1 for the first); the moments are updated in place:
    ``x (1 - lr wd) - lr / (1 - beta1^t) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``."""
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
    return x * (1 - lr * weight_decay) - (lr / (1 - beta1**step)) * exp_avg / denom
