"""What every PSI-LoRA-family optimizer shares: finding the LoRA layers, capturing their
gradient factors, the optimizer for the other trainable parameters, clipping by the full
gradient norm, skipping non-finite steps, and the torch.optim API around it all."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..capture import ActivationCapture, LayerBatch
from ..lora_layers import LoRALayer, find_lora_layers, other_parameters
from ..ops import compute_dtype, frobenius_sq

logger = logging.getLogger(__name__)

OtherOptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

# Proximal weights are floored here: lr can be 0 (warm-up), and lam must stay > 0.
MIN_PROX_WEIGHT = 1e-12
# As in torch.nn.utils.clip_grad_norm_.
CLIP_EPS = 1e-6


class LoRAOptimizer(torch.optim.Optimizer):
    """Base class of the optimizers that update peft LoRA factors from captured ``X``, ``Z``.

    ``param_groups[0]`` holds the LoRA factors and this optimizer's hyperparameters; the
    param groups of the optimizer for the other trainable parameters follow it (the same
    dict objects), so an LR scheduler over this optimizer drives both.
    """

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        max_grad_norm: float | None,
        other_optimizer: OtherOptimizerFactory | None,
    ):
        if defaults["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        self.layers: list[LoRALayer] = find_lora_layers(model)
        params = [p for layer in self.layers for p in (layer.A, layer.B)]
        super().__init__([{"params": params, "name": "lora"}], defaults)
        self.max_grad_norm = max_grad_norm
        self.capture = ActivationCapture(self.layers)
        others = other_parameters(model, self.layers)
        self.other_optimizer: torch.optim.Optimizer | None = None
        if others:
            factory = other_optimizer or (lambda ps: torch.optim.AdamW(ps, lr=defaults["lr"]))
            self.other_optimizer = factory([p for _, p in others])
            self.param_groups.extend(self.other_optimizer.param_groups)
            logger.info(
                "%d LoRA layers go to %s; %d other trainable tensors (%s...) to %s",
                len(self.layers), type(self).__name__, len(others),
                ", ".join(n for n, _ in others[:3]), type(self.other_optimizer).__name__,
            )
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None

    # ---- what a subclass provides -------------------------------------------------------------
    def _update_layer(
        self, layer: LoRALayer, state: dict[str, Any], X: torch.Tensor, Z: torch.Tensor,
        clip: float, group: dict[str, Any],
    ) -> None:
        """Update ``layer``'s factors in place from its captured ``X`` (N x n) and ``Z`` (N x m)."""
        raise NotImplementedError

    # ---- torch.optim API ------------------------------------------------------------------------
    @property
    def lora_group(self) -> dict[str, Any]:
        return self.param_groups[0]

    def _other_params(self) -> Iterable[nn.Parameter]:
        for group in self.param_groups[1:]:
            yield from group["params"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = self.capture.pop()
        if not self._all_finite(batches):
            self.skipped_steps += 1
            logger.warning("non-finite gradient factors: step skipped (%d so far)", self.skipped_steps)
            return loss
        clip = self._clip_coefficient(batches)
        group = self.lora_group
        for idx, batch in batches.items():
            layer = self.layers[idx]
            self._update_layer(layer, self.state[layer.A], batch.X(), batch.Z(), clip, group)
        # A layer that captured nothing keeps its factors and state, as torch optimizers skip p.grad None.
        if self.other_optimizer is not None:
            if clip != 1.0:
                for p in self._other_params():
                    if p.grad is not None:
                        p.grad.mul_(clip)
            self.other_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    def _all_finite(self, batches: dict[int, LayerBatch]) -> bool:
        checks = [torch.isfinite(t).all() for b in batches.values() for t in (*b.xs, *b.zs)]
        checks += [torch.isfinite(p.grad).all() for p in self._other_params() if p.grad is not None]
        return bool(torch.stack(checks).all()) if checks else True

    def grad_norm(self, batches: dict[int, LayerBatch]) -> float:
        """Exact ``||G||_F`` over every LoRA layer's effective weight (``G = Z^T X / scaling``) and
        the other trainable parameters' gradients (METHOD.md section 6, one process)."""
        total = 0.0
        for idx, batch in batches.items():
            total += float(frobenius_sq(batch.Z(), batch.X())) / self.layers[idx].scaling ** 2
        for p in self._other_params():
            if p.grad is not None:
                total += float(p.grad.to(compute_dtype(p.grad.dtype)).square().sum())
        return math.sqrt(total)

    def _clip_coefficient(self, batches: dict[int, LayerBatch]) -> float:
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return 1.0
        self.last_grad_norm = self.grad_norm(batches)
        return min(1.0, self.max_grad_norm / (self.last_grad_norm + CLIP_EPS))

    def prox_weight(self, group: dict[str, Any]) -> float:
        """``lam = lr * prox``, floored (METHOD.md section 2)."""
        return max(group["lr"] * group["prox"], MIN_PROX_WEIGHT)

    # ---- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        group = {k: v for k, v in self.lora_group.items() if k != "params"}
        state = {layer.name: dict(self.state[layer.A]) for layer in self.layers if self.state.get(layer.A)}
        return {
            "layers": state,
            "lora_group": group,
            "other": self.other_optimizer.state_dict() if self.other_optimizer else None,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = {layer.name for layer in self.layers}
        unknown = set(state_dict["layers"]) - names
        if unknown:
            raise ValueError(
                f"optimizer checkpoint has state for {len(unknown)} LoRA layers this model lacks "
                f"(e.g. {sorted(unknown)[0]}): load it into the same peft model it was saved from"
            )
        if (state_dict["other"] is None) != (self.other_optimizer is None):
            raise ValueError("optimizer checkpoint and model disagree on having non-LoRA trainable parameters")
        self.state.clear()
        for layer in self.layers:
            saved = state_dict["layers"].get(layer.name)
            if saved is not None:
                device = layer.A.device
                self.state[layer.A] = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()
                }
        self.lora_group.update(state_dict["lora_group"])
        if self.other_optimizer is not None:
            self.other_optimizer.load_state_dict(state_dict["other"])
            # load_state_dict replaces the other optimizer's group dicts: share them again.
            self.param_groups[1:] = self.other_optimizer.param_groups
        self.skipped_steps = state_dict["skipped_steps"]
        self.capture.clear()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model (the optimizer cannot step afterwards)."""
        self.capture.remove()
