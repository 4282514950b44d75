"""QLoRA on CPU: keep bitsandbytes' 4-bit layers on their training kernel in eval mode too.

On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit.forward`` repacks a 4-bit weight in place for a
faster CPU inference kernel the first time it runs with the module in eval mode and an input that
does not require grad (every evaluation under ``torch.no_grad``). Measured with bitsandbytes 0.50.2:
- the repacking raises for layers whose ``in_features`` is below the quantization block size (64)
  or not a multiple of it (``RuntimeError: shape '[32, 0]' is invalid``);
- where it succeeds, the weight stays repacked, and later *training* forwards through it return an
  output whose backward does not reach the layer's input: every gradient that should flow through
  the frozen 4-bit base into earlier layers is silently lost (LoRA factors below it get wrong
  gradients); the inference kernel's outputs also differ from the training kernel's (~5e-3).
The switch ``support_avx512bf16_for_cpu`` on the module is how bitsandbytes itself decides; turning
it off makes eval use the same kernel as training. GPUs never take this path.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def keep_training_kernels(model: nn.Module) -> int:
    """Make every bitsandbytes 4-bit layer of ``model`` use its training kernel in eval mode as well.

    Call it on a QLoRA model that will be evaluated between training steps on a CPU; it changes
    nothing on GPUs. Returns the number of layers switched.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    if switched:
        logger.info("bitsandbytes: %d 4-bit layers keep their training kernel in eval mode (AVX512-BF16 CPU)",
                    switched)
    return switched
