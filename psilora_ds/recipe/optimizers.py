"""``--optim``: the method registry (:mod:`psilora_ds.optim.registry`) built from the recipe's config, and the LR
schedule."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..distributed import Distributor
from ..optim.registry import METHODS, AdamW, hyperparameter_arguments
from .config import ConfigError, TrainConfig, is_builtin

logger = logging.getLogger(__name__)

OPTIMIZERS = METHODS  # (the name the recipe's tests and benches use)


def resolve_lr(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``lr`` filled when it was not given (:attr:`Method.default_lr`), the choice logged."""
    if cfg.lr is not None:
        return cfg
    method = METHODS[cfg.optim]
    builtin, other = method.default_lr
    lr = builtin if is_builtin(cfg.model) else other
    logger.info("lr not given: %g for %s on %s (%s)", lr, cfg.optim, cfg.model,
                "the best of bench/finetune_real.py on the built-in base" if is_builtin(cfg.model) and method.lr_measured
                else "a common starting point, not a measurement: tune --lr for your model")
    return dataclasses.replace(cfg, lr=lr)


def check_optim(cfg: TrainConfig) -> None:
    if cfg.optim not in METHODS:
        raise ConfigError(f"optim={cfg.optim!r}: choose one of {', '.join(METHODS)}")
    if not METHODS[cfg.optim].any_engine and (cfg.ds_config is not None or cfg.fsdp):
        raise ConfigError(f"optim={cfg.optim} runs only on plain PyTorch (one process, or DDP under torchrun): peft's "
                          "preconditioner reads gradients that DeepSpeed and FSDP2 keep elsewhere; drop --ds_config / "
                          "--fsdp, or choose another optim")


def build_optimizer(cfg: TrainConfig, model: nn.Module, distributor: Distributor | None = None) -> torch.optim.Optimizer:
    """The ``--optim`` optimizer on ``model``; a hyperparameter it refuses is one line.

    PSI-LoRA optimizers get ``max_grad_norm`` themselves (the one clipping route: the DeepSpeed helper
    checks the config's ``gradient_clipping``, which the recipe fills with the same value); the torch
    baselines are clipped by the engine (DeepSpeed, or :class:`~psilora_ds.recipe.engines.PlainEngine`).
    ``distributor``: the engine's (:meth:`~psilora_ds.recipe.backends.Backend.distributor`; None: detected)."""
    check_optim(cfg)
    cfg = resolve_lr(cfg)
    method = METHODS[cfg.optim]
    arguments = hyperparameter_arguments(method, vars(cfg))
    if method.lora:
        arguments.update(lora_options(cfg, distributor))
    try:
        return method.build(model, cfg.lr, **arguments)
    except ValueError as err:  # the optimizers check their hyperparameters (lr >= 0, iters >= 0, betas, ...)
        raise ConfigError(f"optim={cfg.optim}: {err}") from None


def lora_options(cfg: TrainConfig, distributor: Distributor | None = None) -> dict[str, Any]:
    """The PSI-LoRA family's shared options (:class:`~psilora_ds.optim.options.LoRAOptions`) from the config."""
    def other(params):
        return AdamW(params, lr=cfg.other_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    return dict(max_grad_norm=cfg.max_grad_norm or None, clip_norm_probes=cfg.clip_norm_probes, other_optimizer=other,
                cache_free=cfg.cache_free, cache_max_bytes=cfg.cache_max_bytes, cache_offload=cfg.cache_offload,
                accumulation_steps=cfg.gradient_accumulation_steps,
                distributor=distributor)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
