"""Optimizers with the torch.optim API: state, schedules, checkpoints."""

from .base import LoRAOptimizer
from .psilora import PreconditionedLoRA, PSILoRA
from .scaled import ScaledPSILoRA
from .svdlora import SVDLoRA

__all__ = ["LoRAOptimizer", "PSILoRA", "PreconditionedLoRA", "ScaledPSILoRA", "SVDLoRA"]
