"""The optimizer of a PSI-LoRA optimizer's other trainable parameters (heads, norms, ``modules_to_save``):
built, stepped with the engine's group selection and the step's clipping, and kept or undone with the LoRA half."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .options import LoRAOptions


def build_other_optimizer(options: LoRAOptions, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``options.other_optimizer(params)`` (default AdamW at ``other_lr``); a guarded optimizer
    (:func:`~psilora_ds.optim.finite_guard.skipping_non_finite`) keeps its step's copy until the LoRA half is done,
    so that a step is applied whole or not at all."""
    factory = options.other_optimizer or (lambda ps: torch.optim.AdamW(ps, lr=options.other_lr))
    optimizer = factory(params)
    if hasattr(optimizer, "keep_undo"):
        optimizer.keep_undo = True
    return optimizer


def group_params(groups: list[dict[str, Any]]) -> Iterable[nn.Parameter]:
    for group in groups:
        yield from group["params"]


def local_grads(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    """This rank's part of the gradients of ``groups``' parameters (the local shard of a DTensor)."""
    grads = [p.grad for p in group_params(groups) if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def step_other(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], clip: float) -> None:
    """Step ``optimizer`` on ``groups`` only (the groups the engine handed over now), gradients scaled by ``clip``."""
    if clip != 1.0:
        for p in group_params(groups):
            if p.grad is not None:
                p.grad.mul_(clip)
    all_groups = optimizer.param_groups
    optimizer.param_groups = groups
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = all_groups


def other_step_was_undone(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the other-parameter optimizer undid this step's update (non-finite): then the LoRA half is not
    applied either (its own skip counter already counted the step)."""
    return bool(getattr(optimizer, "last_step_skipped", False))


def finish_other_step(optimizer: torch.optim.Optimizer | None, applied: bool) -> None:
    """The other-parameter half of a step follows the LoRA half: kept when it was applied, else undone."""
    if optimizer is None or not hasattr(optimizer, "undo_last_step"):
        return
    if not applied:
        optimizer.undo_last_step()
    optimizer.release_undo()
