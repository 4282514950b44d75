"""Optimizers with the torch.optim API: state, schedules, checkpoints."""

from .base import LoRAOptimizer
from .finite_guard import skipping_non_finite
from .options import LoRAOptions, OtherOptimizerFactory
from .polar import PoLAR
from .psilora import PreconditionedLoRA, PSILoRA
from .scaled import ScaledPSILoRA
from .registry import METHODS, Method
from .svdlora import SVDLoRA, SVDLoRAAdam

# the family by name, as psilora_ds.hf's psilora=dict(optim=...) takes it (the registry's lora methods)
OPTIMIZERS_BY_NAME = {name: m.optimizer_class for name, m in METHODS.items() if m.lora}

__all__ = ["LoRAOptimizer", "LoRAOptions", "METHODS", "Method", "OPTIMIZERS_BY_NAME", "OtherOptimizerFactory", "PoLAR", "PSILoRA",
           "PreconditionedLoRA", "ScaledPSILoRA", "SVDLoRA", "SVDLoRAAdam", "skipping_non_finite"]
