"""The paper's linear synthetic task (a LoRA layer fitting a random target), shared by the
example, the benchmark and the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn


@dataclass
class LinearTask:
    model: nn.Module  # peft model over a zero-initialized Linear(n, m), rank-r LoRA from peft's init
    X: torch.Tensor  # inputs (identity: the loss is ||W - W_target||_F^2)
    Y: torch.Tensor  # targets X @ W_target^T
    f_opt: float  # best loss of a rank-r weight (Eckart-Young on W_target)

    def loss(self) -> torch.Tensor:
        """Summed MSE."""
        return F.mse_loss(self.model(self.X), self.Y, reduction="sum")


def linear_task(seed: int = 0, m: int = 600, n: int = 200, rank: int = 8, inputs: str = "identity") -> LinearTask:
    """``inputs="identity"``: X = I (n rows), the loss is ``||W - W_target||_F^2``. ``inputs="random"``:
    X has 2n Gaussian rows scaled by 1/sqrt(2n); then ``f_opt`` is the best rank-r fit in the metric of
    ``X^T X`` (computed exactly through the thin QR of X)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(m, n, generator=g)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(n, m, bias=False))
    nn.init.zeros_(base[0].weight)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    if inputs == "identity":
        X = torch.eye(n)
        f_opt = float(torch.linalg.svdvals(target)[rank:].square().sum())
    elif inputs == "random":
        X = torch.randn(2 * n, n, generator=g) / (2 * n) ** 0.5
        # ||X W^T - X T^T||^2 = ||R (W - T)^T||^2 with X = QR: best rank-r is svd_r of T R^T
        R = torch.linalg.qr(X.double())[1]
        f_opt = float(torch.linalg.svdvals(target.double() @ R.T)[rank:].square().sum())
    else:
        raise ValueError(f"inputs must be 'identity' or 'random', got {inputs!r}")
    return LinearTask(model, X, X @ target.T, f_opt)


def train_full_batch(
    task: LinearTask, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], steps: int
) -> list[float]:
    """Full-batch training; returns the losses before each step and the final loss (``steps + 1`` values)."""
    opt = make_optimizer(task.model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(task.loss()))
    return losses


def reducible_left(task: LinearTask, losses: list[float]) -> float:
    """``(f - f_opt) / (f_0 - f_opt)``: 1 at the start, 0 at the best rank-r fit."""
    return (losses[-1] - task.f_opt) / (losses[0] - task.f_opt)
