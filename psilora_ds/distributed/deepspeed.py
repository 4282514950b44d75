"""DeepSpeed engines, ZeRO stages 0-3, through DeepSpeed's public API (METHOD.md section 6).

What the engine changes and how this distributor follows it:
- At ZeRO >= 1 the engine hands the optimizer flat fp32 partitions instead of the LoRA factors and
  frees ``p.grad``. PSI-LoRA needs neither: it reads the full fp32 master of each factor with
  ``deepspeed.utils.safe_get_full_fp32_param`` and writes the new one with
  ``safe_set_full_fp32_param``; the engine then copies masters to the low-precision model weights.
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

import logging

import torch
import torch.distributed as dist

from ..lora_layers import LoRALayer
from .ddp import DDPDistributor

logger = logging.getLogger(__name__)


class DeepSpeedDistributor(DDPDistributor):
    """Adapter for a ``deepspeed.DeepSpeedEngine`` (built by :func:`psilora_ds.deepspeed.initialize`)."""

    def __init__(self, engine, *, norm_probes: int = 32):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        super().__init__(engine.data_parallel_group, shard_state=self.stage >= 1, norm_probes=norm_probes)
        self._scale = 1.0
        self._steps_seen = engine.global_steps
        self.dropped_captures = 0
        self._hook = engine.module.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module, args) -> None:
        if self.engine.global_steps != self._steps_seen:
            self._steps_seen = self.engine.global_steps
            capture = self.optimizer.capture
            if capture.nbytes:  # the engine skipped the step (overflow) without calling step()
                self.dropped_captures += 1
                logger.warning("the engine skipped a step: dropping its captured factors (%d bytes)", capture.nbytes)
            capture.clear()
            self.optimizer._plan = None
        if self.engine.fp16_enabled():
            self._scale = float(self.engine.optimizer.loss_scale)

    def grad_coef(self) -> float:
        return 1.0 / (self.world_size * self._scale)

    def _flattened(self) -> bool:
        return len(self.optimizer.lora_group["params"]) != self.n_lora_params

    def read_factors(self, layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._flattened():
            return super().read_factors(layer)
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(layer.A), safe_get_full_fp32_param(layer.B)

    def write_factors(self, layer: LoRALayer, A: torch.Tensor, B: torch.Tensor) -> None:
        if not self._flattened():
            return super().write_factors(layer, A, B)
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(layer.A, A.float())
        safe_set_full_fp32_param(layer.B, B.float())

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
