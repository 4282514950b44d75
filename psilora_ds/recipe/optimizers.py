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
    """``cfg`` with ``lr`` filled when it was not given (a built-in base: :attr:`Method.default_lr`), the choice
    logged; any other model must be given one (:func:`check_optim` refuses it first)."""
    if cfg.lr is not None:
        return cfg
    if not is_builtin(cfg.model):
        raise ConfigError(lr_advice(cfg.optim, cfg.model))
    method = METHODS[cfg.optim]
    logger.info("lr not given: %g for %s on %s (%s)", method.default_lr, cfg.optim, cfg.model,
                "the best of bench/finetune_real.py on the built-in base" if method.lr_measured
                else "a starting point, not a measurement")
    return dataclasses.replace(cfg, lr=method.default_lr)


def lr_advice(optim: str, model: str) -> str:
    """The one-line refusal of ``--lr null`` on a model that is not built in, with what to try."""
    ratio = METHODS[optim].adamw_lr_ratio
    if ratio is None:
        hint = f"{optim}'s best lr was not measured here: sweep 3 values half a decade apart"
    else:
        lo, hi = ratio
        times = f"{lo:g}x" if lo == hi else f"{lo:g}-{hi:g}x"
        example = f"{2e-4 * lo:.2g}" if lo == hi else f"{2e-4 * lo:.2g}-{2e-4 * hi:.2g}"
        hint = (f"for {optim} start at {times} the lr LoRA-AdamW takes on this model (its measured best-lr ratio; "
                f"e.g. {example} beside AdamW's 2e-4) and sweep a decade around it")
    return (f"lr not given for model {model}: a best lr does not transfer between models (LoRA-AdamW's moved from "
            f"1e-2 on the built-in base to 2.2e-3 and 4.6e-3 on one 5x larger; docs/BENCHMARKS.md, Quality map): "
            f"pass --lr; {hint}")


def lr_unit_warning(cfg: TrainConfig) -> str | None:
    """The warning for an lr in the units of Scaled PSI-LoRA's former default metric power (1/2) given to its default
    power 1 under K-FAC: over ten times the largest best lr measured at power 1 (the built-in base's, the registry's
    ``default_lr``; the quality map's were 2.2e-4 to 1e-3), the range of power 1/2's bests (0.0215-0.1): its steps
    are ten to a hundred times too large (in the quality map such lrs ended above the base's loss; METHOD.md section 4).
    None otherwise."""
    if cfg.optim != "scaled_psilora" or cfg.metric != "kfac" or cfg.lr is None:
        return None
    method = METHODS[cfg.optim]
    if cfg.metric_power != method.default("metric_power", cfg) or cfg.lr <= 10 * method.default_lr:
        return None
    return (f"lr {cfg.lr:g} is over 10x the best lrs measured for scaled_psilora at its default metric_power 1 "
            f"(2.2e-4 to {method.default_lr:g}, {method.adamw_lr_ratio[0]:g}-{method.adamw_lr_ratio[1]:g}x "
            "LoRA-AdamW's): it is in the units of metric_power 0.5, the default before (10-22x LoRA-AdamW's); lower "
            "--lr about 100x, or pass --metric_power 0.5 to train as before")


def check_optim(cfg: TrainConfig) -> None:
    """The method exists, runs on the chosen engine, and has an lr (given, or measured on a built-in base)."""
    if cfg.optim not in METHODS:
        raise ConfigError(f"optim={cfg.optim!r}: choose one of {', '.join(METHODS)}")
    if cfg.lr is None and not is_builtin(cfg.model):
        raise ConfigError(lr_advice(cfg.optim, cfg.model))
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
    if warning := lr_unit_warning(cfg):
        logger.warning(warning)
    method = METHODS[cfg.optim]
    if "iters" in method.takes:
        cfg = choose_iters(cfg, model)
    arguments = hyperparameter_arguments(method, vars(cfg))
    if method.lora:
        arguments.update(lora_options(cfg, distributor))
    try:
        return method.build(model, cfg.lr, **arguments)
    except ValueError as err:  # the optimizers check their hyperparameters (lr >= 0, iters >= 0, betas, ...)
        raise ConfigError(f"optim={cfg.optim}: {err}") from None


def step_row_bytes(cfg: TrainConfig, model: nn.Module) -> int:
    """Bytes of the activation rows (``X``, ``Z`` of every LoRA layer) one rank captures in a step: its tokens per step
    (micro-batch x sequence x accumulation) times ``sum(in + out)`` numbers in the activations' dtype."""
    from ..lora_layers import find_lora_layers

    layers = find_lora_layers(model, polar=METHODS[cfg.optim].adapter == "polar")
    tokens = cfg.micro_batch_size * cfg.max_seq_len * cfg.gradient_accumulation_steps
    width = 2 if cfg.dtype in ("bf16", "fp16") else 4
    return tokens * sum(layer.in_features + layer.out_features for layer in layers) * width


def choose_iters(cfg: TrainConfig, model: nn.Module) -> TrainConfig:
    """``iters auto``: 1 (rows kept, LoRSum) while a step's rows fit the cache budget, else 0 (the cache-free Jacobi
    step), logged once with the figures; ``iters >= 1`` over the budget: one warning that the rows will be folded
    into dense fp32 stores (+0.2-0.4x step time in bench/cache_policy.py) and that iters 0 is the cache-free choice."""
    from ..capture import default_cache_budget, parse_cache_budget

    rows = step_row_bytes(cfg, model)
    budget = parse_cache_budget(cfg.cache_max_bytes)
    if budget == "auto":
        budget = default_cache_budget(next(p for p in model.parameters() if p.requires_grad).device)
    mib = 1 / 2**20
    figures = (f"a step's activation rows {rows * mib:.1f} MiB per rank "
               f"({cfg.micro_batch_size} x {cfg.max_seq_len} tokens x {cfg.gradient_accumulation_steps} micro-batches), "
               f"cache budget {'none' if budget is None else f'{budget * mib:.1f} MiB'}")
    fits = budget is None or rows <= budget
    if cfg.iters == "auto":
        iters = 1 if fits else 0
        logger.info("iters auto -> %d: %s (%s)", iters, figures,
                    "rows kept, LoRSum on them" if fits else "over the budget: cache-free Jacobi steps")
        return dataclasses.replace(cfg, iters=iters)
    if cfg.iters >= 1 and not fits:
        logger.warning("iters %d with %s: layers will be folded into dense fp32 stores (+0.2-0.4x step time measured "
                       "by bench/cache_policy.py); iters 0 (or --iters auto) is the cache-free choice", cfg.iters,
                       figures)
    return cfg


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
