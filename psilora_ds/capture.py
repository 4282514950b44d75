"""Capture of each LoRA layer's gradient factors ``X`` and ``Z`` (METHOD.md section 1).

For every adapter a forward pre-hook on ``lora_A`` records its input (after LoRA dropout, and
after peft's cast to the adapter dtype) and a forward hook on ``lora_B`` registers a tensor
hook on its output. That tensor hook receives ``Z = dL/d lora_B(...)`` (it carries ``scaling``)
and commits the pair ``(X, Z)``. Committing only from the backward pass makes the capture exact
under gradient checkpointing: a forward under ``no_grad`` (reentrant checkpointing) registers
nothing, and a recomputed forward that is never back-propagated (non-reentrant checkpointing)
never fires its hook. Pairs from successive micro-batches are appended, so that
``sum_i Z_i^T X_i`` is the accumulated gradient of the product ``B A``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .lora_layers import LoRALayer


@dataclass
class LayerBatch:
    """The captured factors of one layer: rows of all micro-batches since the last step."""

    xs: list[torch.Tensor] = field(default_factory=list)  # each (N_i, n)
    zs: list[torch.Tensor] = field(default_factory=list)  # each (N_i, m)

    @property
    def rows(self) -> int:
        return sum(x.shape[0] for x in self.xs)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.xs, *self.zs))

    def X(self) -> torch.Tensor:
        return self.xs[0] if len(self.xs) == 1 else torch.cat(self.xs)

    def Z(self) -> torch.Tensor:
        return self.zs[0] if len(self.zs) == 1 else torch.cat(self.zs)


class ActivationCapture:
    """Hooks on the peft LoRA layers that cache ``X`` and ``Z`` per layer (in the activation dtype)."""

    def __init__(self, layers: list[LoRALayer]):
        self.layers = layers
        self._batches: dict[int, LayerBatch] = {}
        self._pending_x: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for idx, layer in enumerate(layers):
            self._handles.append(layer.lora_A.register_forward_pre_hook(self._make_input_hook(idx)))
            self._handles.append(layer.lora_B.register_forward_hook(self._make_output_hook(idx)))

    def _make_input_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._pending_x[idx] = args[0]

        return hook

    def _make_output_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = self._pending_x.pop(idx, None)
            if x is None or not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = x.detach()

            def commit(grad: torch.Tensor) -> None:
                batch = self._batches.setdefault(idx, LayerBatch())
                batch.xs.append(x.reshape(-1, x.shape[-1]))
                batch.zs.append(grad.detach().reshape(-1, grad.shape[-1]))

            output.register_hook(commit)

        return hook

    def pop(self) -> dict[int, LayerBatch]:
        """Hand over everything captured since the last call and start empty."""
        batches, self._batches = self._batches, {}
        return batches

    def clear(self) -> None:
        self._batches = {}
        self._pending_x = {}

    @property
    def nbytes(self) -> int:
        """Bytes currently held by the cache."""
        return sum(b.nbytes for b in self._batches.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
