"""``psilora_ds.deepspeed.initialize``: ``deepspeed.initialize`` for a PSI-LoRA optimizer.

Same arguments, same returned tuple ``(engine, optimizer, training_dataloader, lr_scheduler)``::

    engine, optimizer, _, scheduler = psilora_ds.deepspeed.initialize(
        model=peft_model, optimizer=PSILoRA(peft_model, lr=...), config="ds_configs/zero2.json")
    loss = engine(**batch).loss; engine.backward(loss); engine.step()

Why a helper is unavoidable (three things ``deepspeed.initialize`` cannot do for a client optimizer):
1. Clipping. PSI-LoRA clips by the norm of the full gradient ``||G||_F`` (LoRA layers from their
   captured factors, plus the other trainable parameters), not by the norm of ``A.grad``/``B.grad``
   that the engine would use. The helper reads the config's ``gradient_clipping`` (DeepSpeed
   defaults it to 1.0 when the key is absent), gives it to the optimizer as ``max_grad_norm`` and
   sets the engine's to 0 so that nothing is clipped twice.
2. ZeRO >= 1 runs client optimizers only with ``zero_allow_untested_optimizer``; the helper sets it.
3. The optimizer must know the engine (data-parallel group, loss scale, fp32 masters, skipped
   steps): the helper attaches a :class:`~psilora_ds.distributed.deepspeed.DeepSpeedDistributor`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

from .optim.base import LoRAOptimizer

logger = logging.getLogger(__name__)


def _load_config(config: Any) -> dict:
    if isinstance(config, (str, os.PathLike)):
        if not os.path.exists(config):
            raise FileNotFoundError(f"DeepSpeed config {config} does not exist")
        with open(config) as f:
            return json.load(f)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def prepare_config(config: Any, optimizer: LoRAOptimizer) -> tuple[dict, float]:
    """The DeepSpeed config the engine must get, and the clipping norm PSI-LoRA applies itself."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    cfg = _load_config(config)
    if "optimizer" in cfg:
        raise ValueError("the DeepSpeed config has an 'optimizer' section: remove it, PSI-LoRA is the optimizer")
    zero = cfg.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(f"zero_optimization.{key} is not supported with PSI-LoRA yet: remove it from the config")
    clip = float(cfg.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT))
    if optimizer.max_grad_norm not in (None, 0, 0.0) and float(optimizer.max_grad_norm) != clip:
        raise ValueError(
            f"max_grad_norm={optimizer.max_grad_norm} on the optimizer but gradient_clipping={clip} in the DeepSpeed "
            "config (1.0 when absent): set it in the config only"
        )
    if stage >= 1 and clip > 0 and len(optimizer._other_groups()) > 1:
        raise ValueError("under ZeRO with clipping, other_optimizer must build a single param group")
    cfg["gradient_clipping"] = 0.0
    if stage >= 1:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg, clip


def initialize(*, model, optimizer: LoRAOptimizer, config: Any = None, **kwargs):
    """``deepspeed.initialize`` with ``optimizer`` a PSI-LoRA optimizer built on ``model``.

    Accepts the arguments of ``deepspeed.initialize`` (``config`` or ``config_params``) and returns
    its tuple. Raises a one-line error for combinations that cannot work.
    """
    import deepspeed

    from .distributed.deepspeed import DeepSpeedDistributor, check_world

    if not isinstance(optimizer, LoRAOptimizer):
        raise TypeError("psilora_ds.deepspeed.initialize needs a psilora_ds optimizer (PSILoRA, ScaledPSILoRA, ...)")
    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None:
        raise ValueError("pass the DeepSpeed config (a dict or a JSON path) as config=")
    cfg, clip = prepare_config(config, optimizer)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=cfg, **kwargs)
    check_world(engine)
    optimizer.max_grad_norm = clip
    # keep a probe count the optimizer's distributor was given (Distributor(norm_probes=k)), else 32
    optimizer.attach(DeepSpeedDistributor(engine, norm_probes=optimizer.distributor.norm_probes or 32))
    logger.info("PSI-LoRA on DeepSpeed ZeRO-%d: clipping ||G||_F to %s, %d data-parallel ranks",
                engine.zero_optimization_stage(), clip, engine.dp_world_size)
    return engine, ds_optimizer, dataloader, scheduler
