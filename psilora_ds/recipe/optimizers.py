"""``--optim`` names to optimizers (one registry entry per optimizer), and the LR schedule."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import PreconditionedLoRA, PSILoRA, ScaledPSILoRA, SVDLoRA
from ..optim import skipping_non_finite
from ..distributed import FSDP2Distributor
from .config import ConfigError, TrainConfig, is_builtin

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerEntry:
    """How ``--optim NAME`` is built. ``lora``: a PSI-LoRA-family optimizer, built as ``build(cfg, model,
    options)`` with the family's shared options; otherwise a baseline ``build(cfg, model)`` over every trainable
    parameter (torch, or peft's LoRA+ / Riemannian wrappers of AdamW). ``any_engine``: False where only plain
    PyTorch runs it correctly."""

    build: Callable[..., torch.optim.Optimizer]
    lora: bool
    # lr when --lr is not given: (on a built-in base, on any other model). The built-in figures are the best mean
    # eval loss of bench/finetune_real.py (docs/BENCHMARKS.md, "Real-text fine-tuning"); the others are common
    # starting points, not measurements: tune lr for your model
    default_lr: tuple[float, float]
    any_engine: bool = True


# the torch optimizers of the baselines and of PSI-LoRA's non-LoRA parameters, undoing steps that leave a
# non-finite value (psilora_ds.optim.finite_guard): no method writes NaN into the weights
AdamW = skipping_non_finite(torch.optim.AdamW)
SGD = skipping_non_finite(torch.optim.SGD)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _loraplus(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                     betas=_betas(cfg), weight_decay=cfg.weight_decay)


def _riemannian(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    try:
        from peft.optimizers import create_riemannian_optimizer
    except ImportError:
        import peft

        raise ConfigError(f"optim=riemannian needs peft.optimizers.create_riemannian_optimizer, which peft "
                          f"{peft.__version__} lacks: pip install -U peft") from None

    return create_riemannian_optimizer(model, AdamW, lr=cfg.lr, reg=cfg.riemannian_reg, betas=_betas(cfg),
                                       weight_decay=cfg.weight_decay)


def _betas(cfg: TrainConfig) -> tuple[float, float]:
    return tuple(cfg.betas)


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "psilora": OptimizerEntry(lambda cfg, model, o: PSILoRA(
        model, cfg.lr, momentum=cfg.momentum, iters=cfg.iters, prox=cfg.prox, rank_multiplier=cfg.rank_multiplier,
        momentum_prox=cfg.momentum_prox, first_step_iters=cfg.first_step_iters, **o), lora=True, default_lr=(0.1, 2e-3)),
    "scaled_psilora": OptimizerEntry(lambda cfg, model, o: ScaledPSILoRA(
        model, cfg.lr, betas=_betas(cfg), iters=cfg.iters, prox=cfg.prox, damping=cfg.damping,
        metric_power=cfg.metric_power, metric=cfg.metric, metric_init=cfg.metric_init, rank_multiplier=cfg.rank_multiplier,
        momentum_prox=cfg.momentum_prox, first_step_iters=cfg.first_step_iters, **o), lora=True, default_lr=(0.1, 2e-3)),
    "precond_lora": OptimizerEntry(lambda cfg, model, o: PreconditionedLoRA(
        model, cfg.lr, prox=cfg.prox, first_step_iters=cfg.first_step_iters, **o), lora=True, default_lr=(0.1, 2e-3)),
    "svdlora": OptimizerEntry(lambda cfg, model, o: SVDLoRA(model, cfg.lr, momentum=cfg.momentum, **o), lora=True,
                              default_lr=(0.1, 2e-3)),
    "adamw": OptimizerEntry(lambda cfg, model: AdamW(
        _trainable(model), lr=cfg.lr, betas=_betas(cfg), weight_decay=cfg.weight_decay), lora=False,
        default_lr=(1e-2, 2e-4)),
    # LoRA+ (arXiv 2402.12354): AdamW with the B factors at loraplus_lr_ratio x lr (peft's parameter groups)
    "loraplus": OptimizerEntry(_loraplus, lora=False, default_lr=(1e-3, 5e-5)),
    # Riemannian preconditioned LoRA (arXiv 2402.02347): AdamW on r x r-preconditioned LoRA gradients. peft's
    # preconditioner reads the gradients on the model's own parameters, which DeepSpeed's ZeRO flat partitions
    # and FSDP2's shards are not: plain PyTorch (one process or DDP) only
    "riemannian": OptimizerEntry(_riemannian, lora=False, default_lr=(1e-2, 2e-4), any_engine=False),
    "sgd": OptimizerEntry(lambda cfg, model: SGD(
        _trainable(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay), lora=False,
        default_lr=(2e-3, 2e-3)),  # not benchmarked
}


def resolve_lr(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``lr`` filled when it was not given (:attr:`OptimizerEntry.default_lr`), the choice logged."""
    if cfg.lr is not None:
        return cfg
    builtin, other = OPTIMIZERS[cfg.optim].default_lr
    lr = builtin if is_builtin(cfg.model) else other
    logger.info("lr not given: %g for %s on %s (%s)", lr, cfg.optim, cfg.model,
                "the best of bench/finetune_real.py on the built-in base" if is_builtin(cfg.model)
                else "a common starting point, not a measurement: tune --lr for your model")
    return dataclasses.replace(cfg, lr=lr)


def check_optim(cfg: TrainConfig) -> None:
    if cfg.optim not in OPTIMIZERS:
        raise ConfigError(f"optim={cfg.optim!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not OPTIMIZERS[cfg.optim].any_engine and (cfg.ds_config is not None or cfg.fsdp):
        raise ConfigError(f"optim={cfg.optim} runs only on plain PyTorch (one process, or DDP under torchrun): peft's "
                          "preconditioner reads gradients that DeepSpeed and FSDP2 keep elsewhere; drop --ds_config / "
                          "--fsdp, or choose another optim")


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The ``--optim`` optimizer on ``model``; a hyperparameter it refuses is one line.

    PSI-LoRA optimizers get ``max_grad_norm`` themselves (the one clipping route: the DeepSpeed helper
    checks the config's ``gradient_clipping``, which the recipe fills with the same value); the torch
    baselines are clipped by the engine (DeepSpeed, or :class:`~psilora_ds.recipe.engines.PlainEngine`)."""
    check_optim(cfg)
    cfg = resolve_lr(cfg)
    entry = OPTIMIZERS[cfg.optim]
    try:
        if not entry.lora:
            return entry.build(cfg, model)
        return entry.build(cfg, model, lora_options(cfg))
    except ValueError as err:  # the optimizers check their hyperparameters (lr >= 0, iters >= 0, betas, ...)
        raise ConfigError(f"optim={cfg.optim}: {err}") from None


def lora_options(cfg: TrainConfig) -> dict[str, Any]:
    """The PSI-LoRA family's shared options (:class:`~psilora_ds.optim.options.LoRAOptions`) from the config."""
    def other(params):
        return AdamW(params, lr=cfg.other_lr, betas=_betas(cfg), weight_decay=cfg.weight_decay)

    return dict(max_grad_norm=cfg.max_grad_norm or None, clip_norm_probes=cfg.clip_norm_probes, other_optimizer=other,
                cache_free=cfg.cache_free, cache_max_bytes=cfg.cache_max_bytes, cache_offload=cfg.cache_offload,
                accumulation_steps=cfg.gradient_accumulation_steps,
                distributor=FSDP2Distributor() if cfg.fsdp else None)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
