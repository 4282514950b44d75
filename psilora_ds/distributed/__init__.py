"""Engine adapters ("distributors"): one class per parallelism."""

from .base import Distributor
from .ddp import DDPDistributor, balanced_owners

__all__ = ["DDPDistributor", "Distributor", "balanced_owners"]
