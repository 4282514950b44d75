"""Finding the peft LoRA layers that PSI-LoRA updates, and the parameters it leaves to another optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LoRALayer:
    """One adapter of one peft LoRA module: ``y = W0 x + scaling * B A drop(x)`` (METHOD.md section 1)."""

    name: str  # "<module path>:<adapter name>", stable across runs of the same model
    module: nn.Module  # the peft LoraLayer
    adapter: str
    index: int  # position in the optimizer's layer list; seeds per-layer state deterministically

    @property
    def lora_A(self) -> nn.Linear:
        return self.module.lora_A[self.adapter]

    @property
    def lora_B(self) -> nn.Linear:
        return self.module.lora_B[self.adapter]

    @property
    def A(self) -> nn.Parameter:
        """``r x n`` factor (``lora_A.weight``)."""
        return self.lora_A.weight

    @property
    def B(self) -> nn.Parameter:
        """``m x r`` factor (``lora_B.weight``)."""
        return self.lora_B.weight

    @property
    def S(self) -> nn.Parameter:
        """PoLAR's ``r x r`` core (``lora_S``; :mod:`psilora_ds.polar_adapter`): ``Delta W = scaling B S A``."""
        return self.module.lora_S[self.adapter]

    @property
    def scaling(self) -> float:
        """Read live from peft: ``alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA), or whatever ``set_scale`` made it."""
        return float(self.module.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return int(self.lora_A.out_features)

    @property
    def in_features(self) -> int:
        """``n`` (also under ZeRO-3, where ``A.shape`` is empty outside forward)."""
        return int(self.lora_A.in_features)

    @property
    def out_features(self) -> int:
        """``m``."""
        return int(self.lora_B.out_features)


class NoLoRALayersError(ValueError):
    pass


def find_lora_layers(model: nn.Module, polar: bool = False) -> list[LoRALayer]:
    """All trainable linear LoRA adapters of a peft model, in module order: plain ones (``B A``), or with ``polar``
    PoLAR's (``B S A``, :mod:`psilora_ds.polar_adapter`).

    Raises a one-line error when there are none, when an adapter uses a peft variant (DoRA, ...) whose update is
    not ``B A``, or when an adapter is of the other kind (its update would be trained wrongly).
    """
    from peft.tuners.lora import LoraLayer

    layers: list[LoRALayer] = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, lora_A in module.lora_A.items():
            if not lora_A.weight.requires_grad:
                continue  # a frozen / inactive adapter is not trained
            if adapter in getattr(module, "lora_variant", {}):
                kind = type(module.lora_variant[adapter]).__name__
                raise ValueError(
                    f"PSI-LoRA supports plain LoRA adapters only; {path}:{adapter} uses the peft variant "
                    f"{kind} (e.g. DoRA): set use_dora=False in LoraConfig"
                )
            if hasattr(module, "lora_S") != polar:  # a PoLAR layer (psilora_ds.polar_adapter) or not
                raise ValueError(
                    f"{path}:{adapter} is a PoLAR adapter (Delta W = s B S A), which this optimizer's B A update would "
                    "train wrongly: use optim polar" if not polar else
                    f"{path}:{adapter} is a plain LoRA adapter in a PoLAR run (a layer type PoLAR does not cover, "
                    "e.g. an 8-bit base's Linear8bitLt): PoLAR needs every adapter to be a PoLAR layer "
                    "(psilora_ds.polar_adapter.register_polar)")
            if not isinstance(lora_A, nn.Linear):
                continue  # embedding/conv LoRA: left to the other optimizer (see other_parameters)
            layers.append(LoRALayer(name=f"{path}:{adapter}", module=module, adapter=adapter, index=len(layers)))
    if not layers:
        raise NoLoRALayersError(
            "the model has no trainable peft LoRA linear layers: wrap it with "
            "peft.get_peft_model(model, LoraConfig(target_modules=[...])) before building the optimizer"
        )
    return layers


def other_parameters(model: nn.Module, layers: list[LoRALayer],
                     factors: list[tuple[nn.Parameter, ...]] | None = None) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters that are not LoRA factors of ``layers`` (heads, norms, modules_to_save, biases);
    ``factors``: each layer's factor list (default ``(A, B)``)."""
    lists = factors if factors is not None else [(layer.A, layer.B) for layer in layers]
    lora_ids = {id(p) for f in lists for p in f}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
