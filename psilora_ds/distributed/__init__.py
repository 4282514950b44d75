"""Engine adapters ("distributors"): one class per parallelism."""

from .base import Distributor, LoRAOptimizerProtocol
from .ddp import DDPDistributor, balanced_owners
from .default import default_distributor
from .fsdp import FSDP2Distributor

__all__ = ["DDPDistributor", "Distributor", "FSDP2Distributor", "LoRAOptimizerProtocol", "balanced_owners", "default_distributor"]
