"""DeepSpeed engines, ZeRO stages 0-3, through DeepSpeed's public API (METHOD.md section 6): the
adapter (:class:`DeepSpeedDistributor`) and :func:`initialize`, ``deepspeed.initialize`` for a PSI-LoRA
optimizer::

    from psilora_ds.distributed import deepspeed as psilora_deepspeed
    engine, optimizer, _, scheduler = psilora_deepspeed.initialize(
        model=peft_model, optimizer=PSILoRA(peft_model, lr=...), config="ds_configs/zero2.json")
    loss = engine(**batch).loss; engine.backward(loss); engine.step()

Why a helper is unavoidable (three things ``deepspeed.initialize`` cannot do for a client optimizer):
1. Clipping. PSI-LoRA clips by the norm of the full gradient ``||G||_F`` (LoRA layers from their
   captured factors, plus the other trainable parameters), not by the norm of ``A.grad``/``B.grad``
   that the engine would use. The config's ``gradient_clipping`` (DeepSpeed defaults it to 1.0 when
   the key is absent) is reconciled into the optimizer's ``max_grad_norm`` (the one clipping route:
   adopted when the optimizer has none, an error when they differ) and the engine's set to 0 so that
   nothing is clipped twice.
2. ZeRO >= 1 runs client optimizers only with ``zero_allow_untested_optimizer``; the helper sets it.
3. The optimizer must know the engine (data-parallel group, loss scale, fp32 masters, skipped
   steps): the helper attaches a :class:`DeepSpeedDistributor`.

What the engine changes and how this distributor follows it:
- At ZeRO >= 1 the engine hands the optimizer flat fp32 partitions instead of the LoRA factors and
  frees ``p.grad``. PSI-LoRA needs neither: it reads the full fp32 master of each factor with
  ``deepspeed.utils.safe_get_full_fp32_param`` and writes the new one with
  ``safe_set_full_fp32_param``; the engine then copies masters to the low-precision model weights.
  Reading is a collective per factor (an all-reduce at ZeRO 1/2, an all-gather at ZeRO-3), so steps
  start from the optimizer's own copy of the factors, checked without communication: at ZeRO-3
  against this rank's partition of each factor (``safe_get_local_fp32_param``); at ZeRO 1/2, whose
  fragments have no public local accessor, by comparing this rank's whole flat partition with a
  snapshot taken when the copy last equalled it (any difference: every layer is read again).
  At stage 0 the LoRA param group still lists one tensor per factor (the fp32 masters under bf16).
- The engine averages gradients over the data-parallel group and, under fp16, scales the loss:
  a captured ``Z`` is this rank's share of the gradient times the loss scale of its micro-batch, so
  ``grad_coef`` is ``1 / (world_size * loss_scale)`` with the scale read when the forward ran.
- When the engine skips a step (fp16 overflow) it never calls the optimizer: the forward pre-hook
  drops what was captured during the skipped step when it sees the engine's step counter move.
- At ZeRO >= 1 each rank keeps the optimizer state of the layers it owns (balanced by size), and
  the non-LoRA gradients are partitioned (their squared norms are all-reduced for clipping).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..lora_layers import LoRALayer
from .base import LoRAOptimizerProtocol, pairs_differ
from .ddp import DDPDistributor

logger = logging.getLogger(__name__)


class DeepSpeedDistributor(DDPDistributor):
    """Adapter for a ``deepspeed.DeepSpeedEngine`` (built by :func:`initialize`).

    ``on_skipped_step``: called when the engine finished a step without calling the optimizer (fp16
    overflow); it drops what was captured for that step and returns the bytes dropped (the
    optimizer's :meth:`~psilora_ds.optim.base.LoRAOptimizer.discard_step`).
    """

    def __init__(self, engine, *, on_skipped_step: Callable[[], int]):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        super().__init__(engine.data_parallel_group, shard_state=self.stage >= 1)
        self._scale = 1.0
        self._steps_seen = engine.global_steps
        self._on_skipped_step = on_skipped_step
        self.dropped_captures = 0
        self._hook = engine.module.register_forward_pre_hook(self._before_forward)
        # ZeRO 1/2: this rank's flat fp32 partitions of the LoRA group as they were when the optimizer's factors
        # last equalled the engine's (factors_synced); factors_changed compares against it
        self._snapshot: list[torch.Tensor] | None = None

    def _before_forward(self, module, args) -> None:
        if self.engine.global_steps != self._steps_seen:
            self._steps_seen = self.engine.global_steps
            dropped = self._on_skipped_step()  # nothing left when the optimizer did step
            if dropped:
                self.dropped_captures += 1
                logger.warning("the engine skipped a step: dropping its captured factors (%d bytes)", dropped)
        if self.engine.fp16_enabled():
            self._scale = float(self.engine.optimizer.loss_scale)

    def lora_grads_are_whole(self) -> bool:
        return False  # ZeRO >= 1 partitions and frees p.grad; fp16 scales it (its products stay in the hooks)

    def grad_coef(self) -> float:
        return 1.0 / (self.world_size * self._scale)

    def _flattened(self, masters: Sequence[torch.Tensor]) -> bool:
        return len(masters) != self.n_lora_params

    def read_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if not self._flattened(masters):
            return super().read_factors(layer, masters)
        from deepspeed.utils import safe_get_full_fp32_param

        factors = tuple(safe_get_full_fp32_param(p) for p in self.layer_factors[layer.index])
        self._count_factor_reads(factors)  # (an all-reduce each at ZeRO 1/2, an all-gather at ZeRO-3)
        return factors

    def write_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor], *factors: torch.Tensor) -> None:
        if not self._flattened(masters):
            return super().write_factors(layer, masters, *factors)
        from deepspeed.utils import safe_set_full_fp32_param

        for param, new in zip(self.layer_factors[layer.index], factors, strict=True):
            safe_set_full_fp32_param(param, new.float())

    def reads_factors_collectively(self, masters: Sequence[torch.Tensor]) -> bool:
        # ZeRO >= 1: safe_get_full_fp32_param is an all-reduce (1/2) or all-gather (3) per factor, while
        # factors_changed compares without communication: steps start from the optimizer's factor copy
        return self._flattened(masters) and self.stage >= 1

    def factors_changed(self, layers: Sequence[LoRALayer], masters: Sequence[torch.Tensor],
                        factors: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        if not self._flattened(masters) or self.stage == 0:
            return super().factors_changed(layers, masters, factors)  # stage 0: the masters are local
        if self.stage == 3:
            return self._partitions_changed(layers, factors)
        # ZeRO 1/2: this rank's flat fp32 partition of the LoRA group (the tensors the engine put in the param
        # group) holds a fragment of some factors, where in it is not public; but the partition is. Unchanged bit
        # for bit since the snapshot taken when the optimizer's factors last equalled the engine's means no
        # factor fragment here changed; changed means some may have: flag every layer (all are read again).
        snap = self._snapshot
        if snap is None or len(snap) != len(masters) or any(s.shape != m.shape for s, m in zip(snap, masters)):
            changed = torch.ones((), dtype=torch.bool)
        else:
            changed = pairs_differ(list(zip(masters, snap)), masters[0].device).any()
        device = factors[0][0].device if factors else masters[0].device
        return changed.to(device=device, dtype=torch.float64).expand(len(layers)).clone()

    def _partitions_changed(self, layers: Sequence[LoRALayer],
                            factors: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        # ZeRO-3 keeps elements [rank * p, (rank + 1) * p) of the flattened fp32 master here (the layout
        # safe_set_full_fp32_param writes), the last partition padded; compared on the device (no host sync)
        flags = []
        for layer, given in zip(layers, factors):
            differs = []
            for param, full in zip(self.layer_factors[layer.index], given, strict=True):
                local = safe_get_local_fp32_param(param).reshape(-1)
                start = self.rank * local.numel()
                mine = full.reshape(-1)[start: start + local.numel()].to(local.dtype)
                differs.append(torch.ne(local[: mine.numel()], mine).any().to(given[0].device))
            flags.append(torch.stack(differs).any())
        if not flags:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack(flags).to(torch.float64)

    def factors_synced(self, masters: Sequence[torch.Tensor]) -> None:
        if not self._flattened(masters) or self.stage not in (1, 2):
            return
        snap = self._snapshot
        if snap is not None and len(snap) == len(masters) and all(
                s.shape == m.shape and s.device == m.device for s, m in zip(snap, masters)):
            for s, m in zip(snap, masters):
                s.copy_(m.detach())
        else:
            self._snapshot = [m.detach().clone() for m in masters]

    def other_grads_are_sharded(self) -> bool:
        return self.stage >= 1

    def close(self) -> None:
        self._hook.remove()


def check_world(engine) -> None:
    """One-line errors for engine layouts this distributor does not cover."""
    seq_group = getattr(engine, "seq_parallel_group", None)
    seq_size = dist.get_world_size(seq_group) if seq_group is not None else 1
    if getattr(engine, "mp_world_size", 1) > 1 or seq_size > 1:
        raise ValueError("PSI-LoRA supports data parallelism only: model/sequence parallel sizes must be 1")


def _load_config(config: Any) -> dict:
    if isinstance(config, (str, os.PathLike)):
        if not os.path.exists(config):
            raise FileNotFoundError(f"DeepSpeed config {config} does not exist")
        with open(config) as f:
            return json.load(f)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def prepare_config(config: Any, optimizer: LoRAOptimizerProtocol) -> tuple[dict, float]:
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
            "config (1.0 when absent): make them equal, or leave max_grad_norm unset to take the config's"
        )
    if stage >= 1 and clip > 0 and len(optimizer.other_groups()) > 1:
        raise ValueError("under ZeRO with clipping, other_optimizer must build a single param group")
    cfg["gradient_clipping"] = 0.0
    if stage >= 1:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg, clip


def initialize(*, model, optimizer: LoRAOptimizerProtocol, config: Any = None, **kwargs):
    """``deepspeed.initialize`` with ``optimizer`` a PSI-LoRA optimizer built on ``model``.

    Accepts the arguments of ``deepspeed.initialize`` (``config`` or ``config_params``) and returns
    its tuple. Raises a one-line error for combinations that cannot work.
    """
    import deepspeed

    if not isinstance(optimizer, LoRAOptimizerProtocol):
        raise TypeError("psilora_ds.distributed.deepspeed.initialize needs a psilora_ds optimizer (PSILoRA, "
                        "ScaledPSILoRA, ...)")
    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None:
        raise ValueError("pass the DeepSpeed config (a dict or a JSON path) as config=")
    cfg, clip = prepare_config(config, optimizer)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=cfg, **kwargs)
    check_world(engine)
    optimizer.max_grad_norm = clip
    optimizer.set_accumulation_steps(engine.gradient_accumulation_steps())
    optimizer.attach(DeepSpeedDistributor(engine, on_skipped_step=optimizer.discard_step))
    logger.info("PSI-LoRA on DeepSpeed ZeRO-%d: clipping ||G||_F to %s, %d data-parallel ranks",
                engine.zero_optimization_stage(), clip, engine.dp_world_size)
    return engine, ds_optimizer, dataloader, scheduler
