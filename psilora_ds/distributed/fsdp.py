"""torch FSDP2 (``torch.distributed.fsdp.fully_shard``): factors are DTensors sharded on dim 0.

The full fp32 factors of a layer are all-gathered with ``DTensor.full_tensor()`` when it is updated
(METHOD.md section 6: "gather the factors of one layer at a time") and written back shard by shard
with ``distribute_tensor``; LoRSum never runs on a shard. FSDP2 averages gradients over the mesh,
non-LoRA gradients are sharded (their squared norms add up over ranks), and each rank keeps the
optimizer state of the layers it owns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..lora_layers import LoRALayer
from .base import LoRAOptimizerProtocol
from .ddp import DDPDistributor


class FSDP2Distributor(DDPDistributor):
    """Adapter for models wrapped with ``fully_shard`` over a 1-D data-parallel mesh."""

    def __init__(self, group=None, *, shard_state: bool = True):
        super().__init__(group, shard_state=shard_state)

    def read_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(p.full_tensor() if isinstance(p, DTensor) else p for p in super().read_factors(layer, masters))

    def write_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor], A: torch.Tensor,
                      B: torch.Tensor) -> None:
        for param, new in zip(super().read_factors(layer, masters), (A, B)):
            if isinstance(param, DTensor):
                shard = distribute_tensor(new.to(param.dtype), param.device_mesh, param.placements)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(new)

    def other_grads_are_sharded(self) -> bool:
        return True


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: LoRAOptimizerProtocol) -> None:
    """Save the model, the PSI-LoRA state (each rank its owned layers) and the other optimizer's
    state with ``torch.distributed.checkpoint``; loadable on any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "psilora": optimizer.lora_state_dict()}
    if optimizer.other_optimizer is not None:
        state["other"] = get_optimizer_state_dict(model, optimizer.other_optimizer)
    dcp.save(state, checkpoint_id=path)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: LoRAOptimizerProtocol) -> None:
    """Load what :func:`save_checkpoint` wrote, re-sharding the PSI-LoRA state to this run's ranks
    (each rank reads the layers it owns now, whoever saved them)."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = {"model": get_model_state_dict(model), "psilora": optimizer.lora_state_template()}
    if optimizer.other_optimizer is not None:
        state["other"] = get_optimizer_state_dict(model, optimizer.other_optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    optimizer.load_lora_state_dict(state["psilora"])
    if optimizer.other_optimizer is not None:
        set_optimizer_state_dict(model, optimizer.other_optimizer, state["other"])
        optimizer.resync_param_groups()
