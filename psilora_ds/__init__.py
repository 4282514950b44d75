"""psilora_ds: PSI-LoRA (arXiv 2602.16456) optimizers for peft LoRA fine-tuning."""

from .capture import ActivationCapture, StepNotCalledError
from .lora_layers import LoRALayer, NoLoRALayersError, find_lora_layers
from .optim import LoRAOptimizer, PreconditionedLoRA, PSILoRA, ScaledPSILoRA, SVDLoRA
from .qlora import keep_training_kernels

__version__ = "0.1.0"

__all__ = [
    "ActivationCapture",
    "LoRALayer",
    "LoRAOptimizer",
    "NoLoRALayersError",
    "PSILoRA",
    "PreconditionedLoRA",
    "ScaledPSILoRA",
    "SVDLoRA",
    "StepNotCalledError",
    "find_lora_layers",
    "keep_training_kernels",
]
