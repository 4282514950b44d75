"""The distributor an optimizer uses when given none, read from the model and torch.distributed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..lora_layers import LoRALayer
from .base import Distributor
from .ddp import DDPDistributor
from .fsdp import FSDP2Distributor

logger = logging.getLogger(__name__)


def default_distributor(layers: Sequence[LoRALayer] = ()) -> Distributor:
    """FSDP2 when the LoRA factors are DTensors (``fully_shard`` ran, on any number of ranks); data
    parallelism over the world group when torch.distributed is initialized with several ranks; else
    one process. Each choice but one process is logged once."""
    if any(isinstance(layer.A, DTensor) for layer in layers):
        logger.info("the LoRA factors are DTensors (fully_shard): FSDP2 distributor (pass distributor=... to change it)")
        return FSDP2Distributor()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        logger.info("torch.distributed is initialized: data-parallel LoRSum over the world group "
                    "(pass distributor=... to change it)")
        return DDPDistributor()
    return Distributor()
