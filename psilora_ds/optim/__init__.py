"""Optimizers with the torch.optim API: state, schedules, checkpoints."""

from .base import LoRAOptimizer
from .options import LoRAOptions, OtherOptimizerFactory
from .psilora import PreconditionedLoRA, PSILoRA
from .scaled import ScaledPSILoRA
from .svdlora import SVDLoRA

__all__ = ["LoRAOptimizer", "LoRAOptions", "OtherOptimizerFactory", "PSILoRA", "PreconditionedLoRA", "ScaledPSILoRA", "SVDLoRA"]
