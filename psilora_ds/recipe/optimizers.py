"""``--optim`` names to optimizers, and the LR schedule."""

from __future__ import annotations

import torch
from torch import nn

from .. import PreconditionedLoRA, PSILoRA, ScaledPSILoRA, SVDLoRA
from ..distributed import default_distributor
from .config import ConfigError, TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module, *, clip_inside: bool) -> torch.optim.Optimizer:
    """The ``--optim`` optimizer on ``model``; a hyperparameter it refuses is one line.

    ``clip_inside``: hand ``max_grad_norm`` to PSI-LoRA optimizers (plain PyTorch runs). Under the
    DeepSpeed helper the config's gradient_clipping is used instead."""
    try:
        return _build(cfg, model, clip_inside)
    except ValueError as err:  # the optimizers check their hyperparameters (lr >= 0, iters >= 0, betas, ...)
        raise ConfigError(f"optim={cfg.optim}: {err}") from None


def _build(cfg: TrainConfig, model: nn.Module, clip_inside: bool) -> torch.optim.Optimizer:
    other_lr = cfg.other_lr if cfg.other_lr is not None else cfg.lr

    def other(params):
        return torch.optim.AdamW(params, lr=other_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    clip = cfg.max_grad_norm if clip_inside and cfg.max_grad_norm > 0 else None
    common = dict(max_grad_norm=clip, other_optimizer=other, distributor=default_distributor(cfg.clip_norm_probes))
    if cfg.optim == "psilora":
        return PSILoRA(model, cfg.lr, momentum=cfg.momentum, iters=cfg.iters, prox=cfg.prox,
                       rank_multiplier=cfg.rank_multiplier, **common)
    if cfg.optim == "scaled_psilora":
        return ScaledPSILoRA(model, cfg.lr, betas=tuple(cfg.betas), iters=cfg.iters, prox=cfg.prox, damping=cfg.damping,
                             metric_power=cfg.metric_power, metric=cfg.metric, rank_multiplier=cfg.rank_multiplier,
                             **common)
    if cfg.optim == "precond_lora":
        return PreconditionedLoRA(model, cfg.lr, prox=cfg.prox, **common)
    if cfg.optim == "svdlora":
        return SVDLoRA(model, cfg.lr, momentum=cfg.momentum, **common)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
