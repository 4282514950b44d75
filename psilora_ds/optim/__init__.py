"""Optimizers with the torch.optim API: state, schedules, checkpoints."""

from .base import LoRAOptimizer
from .finite_guard import skipping_non_finite
from .options import LoRAOptions, OtherOptimizerFactory
from .psilora import PreconditionedLoRA, PSILoRA
from .scaled import ScaledPSILoRA
from .svdlora import SVDLoRA

# the family by name, as psilora_ds.hf's psilora=dict(optim=...) takes it (the recipe's --optim uses the same names)
OPTIMIZERS_BY_NAME = {"psilora": PSILoRA, "scaled_psilora": ScaledPSILoRA, "precond_lora": PreconditionedLoRA,
                      "svdlora": SVDLoRA}

__all__ = ["LoRAOptimizer", "LoRAOptions", "OPTIMIZERS_BY_NAME", "OtherOptimizerFactory", "PSILoRA",
           "PreconditionedLoRA", "ScaledPSILoRA", "SVDLoRA", "skipping_non_finite"]
