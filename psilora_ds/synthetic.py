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


def balanced_svd_init(task: LinearTask, seed: int = 0) -> None:
    """Start the LoRA factors at the balanced rank-r truncated SVD of a Kaiming-uniform
    ``nn.Linear(n, m)`` weight: ``A = S^1/2 V^T``, ``B = U S^1/2`` (the paper authors' start for the
    stochastic task; peft's own start is ``B = 0``)."""
    layer = task.model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    r, n = A.shape
    torch.manual_seed(seed)
    W = nn.Linear(n, B.shape[0], bias=False).weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    with torch.no_grad():
        A.copy_(S[:r].sqrt()[:, None] * Vh[:r])
        B.copy_(U[:, :r] * S[:r].sqrt())


def train_stochastic(task: LinearTask, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *,
                     epochs: int = 100, batch_rows: int = 64, seed: int = 0) -> list[float]:
    """Mini-batch training: each epoch visits the rows of ``X`` in a fresh seeded order, in batches of
    ``batch_rows`` (the last one shorter), one optimizer step per batch, summed squared error of the
    batch. Returns the full-data excess loss ``f - f_opt`` before training and after each epoch."""
    opt = make_optimizer(task.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        excess = [float(task.loss()) - task.f_opt]
    for _ in range(epochs):
        order = torch.randperm(task.X.shape[0], generator=g)
        for rows in order.split(batch_rows):
            opt.zero_grad()
            F.mse_loss(task.model(task.X[rows]), task.Y[rows], reduction="sum").backward()
            opt.step()
        with torch.no_grad():
            excess.append(float(task.loss()) - task.f_opt)
    return excess


def reducible_left(task: LinearTask, losses: list[float]) -> float:
    """``(f - f_opt) / (f_0 - f_opt)``: 1 at the start, 0 at the best rank-r fit."""
    return (losses[-1] - task.f_opt) / (losses[0] - task.f_opt)
