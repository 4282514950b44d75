"""PoLAR's adapter (arXiv 2506.03133) on peft's custom-module registration: ``y = W0 x + s B S A drop(x)`` with the
direction factors ``A`` (r x n, orthonormal rows) and ``B`` (m x r, orthonormal columns) initialized orthonormal and
the r x r core ``S`` at zero, so that ``Delta W = 0`` at the start (docs/METHOD.md section 7).

peft's route for custom LoRA layers is ``LoraConfig._register_custom_module`` (documented, experimental:
https://huggingface.co/docs/peft/developer_guides/custom_models); it is not saved with the adapter, so loading one
takes :func:`load_polar` (one call) in place of ``PeftModel.from_pretrained``. :func:`export_plain_lora` writes the
same update as a plain LoRA adapter (``S`` folded into ``B``) that stock peft loads with no registration.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

try:  # (peft defines its 4-bit layer only where bitsandbytes' 4-bit is available)
    from bitsandbytes.nn import Linear4bit as BnbLinear4bit
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:
    BnbLinear4bit = LoraLinear4bit = None

CORE = "lora_S"


class PolarLayer:
    """PoLAR's core ``S`` between peft's ``lora_A`` and ``lora_B`` (per adapter, in the ``lora_S`` parameter dict:
    saved, loaded and made trainable by peft as a ``lora_`` parameter), mixed into a peft LoRA layer class:
    :class:`PolarLinear` (an ``nn.Linear`` base) and :class:`PolarLinear4bit` (a bitsandbytes 4-bit base)."""

    adapter_layer_names = (*LoraLayer.adapter_layer_names, CORE)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        if CORE not in self._modules:  # (peft's update_layer walks every adapter_layer_names dict)
            self.lora_S = nn.ParameterDict()
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            nn.init.orthogonal_(A)  # r x n: orthonormal rows
            nn.init.orthogonal_(B)  # m x r: orthonormal columns
        self.lora_S[adapter_name] = nn.Parameter(torch.zeros(r, r, dtype=A.dtype, device=A.device),
                                                 requires_grad=A.requires_grad)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        S = self.lora_S[adapter]
        delta = (B @ S.to(B.dtype) @ A) * self.scaling[adapter]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("PoLAR layers do not support peft's mixed-adapter batches (adapter_names=...)")
        if self.disable_adapters or self.merged:
            if self.disable_adapters and self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            h = lora_A(self.lora_dropout[adapter](x.to(lora_A.weight.dtype)))
            out = lora_B(F.linear(h, self.lora_S[adapter].to(h.dtype))) * self.scaling[adapter]
            result = result + out.to(result.dtype)  # (out of place: a 4-bit base's output may be a view)
        return result


class PolarLinear(PolarLayer, LoraLinear):
    """PoLAR on an ``nn.Linear`` base layer."""


PolarLinear4bit: type | None = None
if LoraLinear4bit is not None:
    class PolarLinear4bit(PolarLayer, LoraLinear4bit):  # type: ignore[no-redef]
        """PoLAR on a bitsandbytes ``Linear4bit`` base (QLoRA): peft's 4-bit LoRA layer (its merge dequantizes and
        quantizes again) with the core."""


def polar_config(**lora_config: Any) -> LoraConfig:
    """A ``LoraConfig`` (same keywords) whose linear targets become PoLAR layers (:func:`register_polar`)."""
    config = LoraConfig(**lora_config)
    register_polar(config)
    return config


def register_polar(config: LoraConfig) -> LoraConfig:
    """Make ``config``'s linear targets PoLAR layers (peft's custom-module registration): a bitsandbytes 4-bit
    base's ``Linear4bit`` a :class:`PolarLinear4bit` (listed first: it is an ``nn.Linear`` too, and peft takes the
    first match), any other ``nn.Linear`` a :class:`PolarLinear`; returns ``config``."""
    mapping: dict[type, type] = {BnbLinear4bit: PolarLinear4bit} if PolarLinear4bit is not None else {}
    mapping[nn.Linear] = PolarLinear
    config._register_custom_module(mapping)
    return config


def load_polar(base: nn.Module, path: str, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` for an adapter saved from a PoLAR model (its registration is not saved)."""
    config = register_polar(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(base, path, config=config, **kwargs)


def polar_layers(model: nn.Module) -> list[tuple[str, PolarLayer]]:
    """The model's PoLAR layers by module name (none for anything that is not a module tree)."""
    if not isinstance(model, nn.Module):
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PolarLayer)]


@torch.no_grad()
def export_plain_lora(model: PeftModel, out_dir: str, adapter: str = "default",
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model``'s PoLAR adapter as a plain LoRA adapter: ``lora_B <- B S``, ``lora_A <- A``, no core; stock
    peft loads it (``PeftModel.from_pretrained``) with no registration and computes the same ``Delta W``. ``state``:
    the trainable parameters by name to export (the recipe's fp32 masters; default: the model's own)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = dict(state) if state is not None else {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, _ in polar_layers(model):
        b_key, s_key = f"{name}.lora_B.{adapter}.weight", f"{name}.{CORE}.{adapter}"
        if b_key not in state or s_key not in state:
            raise ValueError(f"export_plain_lora: {b_key} or {s_key} missing from the parameters to export")
        state[b_key] = state[b_key] @ state.pop(s_key).to(state[b_key].dtype)
    out = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter)
    config = copy.deepcopy(model.peft_config[adapter])  # (the custom-module registration is never saved)
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file({k: v.detach().contiguous().cpu() for k, v in out.items()},
              os.path.join(out_dir, "adapter_model.safetensors"))
