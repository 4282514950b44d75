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


def linear_task(seed: int = 0, m: int = 600, n: int = 200, rank: int = 8) -> LinearTask:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(m, n, generator=g)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(n, m, bias=False))
    nn.init.zeros_(base[0].weight)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    X = torch.eye(n)
    f_opt = float(torch.linalg.svdvals(target)[rank:].square().sum())
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
