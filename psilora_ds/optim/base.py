"""What every PSI-LoRA-family optimizer shares: finding the LoRA layers, capturing their
gradient factors, the optimizer for the other trainable parameters, clipping by the full
gradient norm, skipping non-finite steps, and the torch.optim API around it all."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..capture import ActivationCapture, LayerBatch
from ..distributed import DDPDistributor, Distributor
from ..lora_layers import LoRALayer, find_lora_layers, other_parameters
from ..ops import compute_dtype, kfac_sums

logger = logging.getLogger(__name__)

OtherOptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

# Proximal weights are floored here: lr can be 0 (warm-up), and lam must stay > 0.
MIN_PROX_WEIGHT = 1e-12
# As in torch.nn.utils.clip_grad_norm_.
CLIP_EPS = 1e-6


@dataclass
class LayerGradient:
    """A layer's (clipped) gradient w.r.t. ``B A`` in factored form: ``P = coef * sum_ranks Z_k^T X_k``.

    ``X`` (N_k x n) and ``Z`` (N_k x m) are this rank's rows (possibly none); ``reduce`` sums a
    tensor over the data-parallel ranks (``None``: one process); ``rows`` counts all ranks' rows.
    """

    X: torch.Tensor
    Z: torch.Tensor
    coef: float
    rows: int
    reduce: Callable[[torch.Tensor], torch.Tensor] | None

    def terms(self, scale: float) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """``scale * P`` as LoRSum terms (rank-local, summed by ``reduce``)."""
        return [(scale * self.coef, self.Z.T, self.X)]

    def kfac_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum over all rows of x**2, sum over all rows of (coef z)**2)``, reduced over ranks."""
        sum_x2, sum_z2 = kfac_sums(self.X, self.Z)
        both = torch.cat([sum_x2, sum_z2 * self.coef**2])
        if self.reduce is not None:
            both = self.reduce(both)
        return both[: self.X.shape[1]], both[self.X.shape[1] :]


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
        distributor: Distributor | None = None,
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
        self.steps_taken = 0
        self.last_grad_norm: float | None = None
        if distributor is None:
            distributor = Distributor()
            if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                    torch.distributed.get_world_size() > 1:
                distributor = DDPDistributor()
                logger.info("torch.distributed is initialized: %s uses data-parallel LoRSum over the world group "
                            "(pass distributor=... to change it)", type(self).__name__)
        self.attach(distributor)

    def attach(self, distributor: Distributor) -> None:
        """Use ``distributor`` from now on (engine helpers call this after building the engine)."""
        self._check_distributor(distributor)
        self.distributor = distributor
        distributor.bind(self)

    def _check_distributor(self, distributor: Distributor) -> None:
        """Raise a one-line error when this optimizer cannot run under ``distributor``."""

    # ---- what a subclass provides -------------------------------------------------------------
    def _init_state(self, layer: LoRALayer, group: dict[str, Any]) -> dict[str, Any]:
        """A layer's initial state; deterministic, so that every rank builds the same one."""
        return {}

    def _update_layer(
        self, layer: LoRALayer, state: dict[str, Any], A: torch.Tensor, B: torch.Tensor,
        grad: LayerGradient, group: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New factors of ``layer`` from its current ``A``, ``B`` and gradient; updates ``state`` in place."""
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
        d = self.distributor
        # One collective tells every rank which layers captured rows anywhere and whether any
        # rank saw a non-finite value, so that all ranks take the same branches.
        flags = torch.zeros(len(self.layers) + 1, dtype=torch.float64, device=self.layers[0].A.device)
        for idx, batch in batches.items():
            flags[idx] = batch.rows
        flags[-1] = 0.0 if self._all_finite(batches) else 1.0
        flags = d.all_reduce_(flags).tolist()
        if flags[-1] > 0:
            self.skipped_steps += 1
            logger.warning("non-finite gradient factors: step skipped on all ranks (%d so far)", self.skipped_steps)
            return loss
        grads = {idx: self._layer_gradient(idx, batches.get(idx), int(rows))
                 for idx, rows in enumerate(flags[:-1]) if rows > 0}
        clip = self._clip_coefficient(grads)
        group = self.lora_group
        for idx, grad in grads.items():
            # A layer that captured nothing on any rank keeps its factors and state, as torch
            # optimizers skip parameters whose grad is None.
            layer = self.layers[idx]
            grad.coef *= clip
            state = self.state[layer.A]
            d.materialize_state(layer, state, lambda: self._init_state(layer, group))
            A, B = d.read_factors(layer)
            A_new, B_new = self._update_layer(layer, state, A, B, grad, group)
            d.write_factors(layer, A_new, B_new)
            d.release_state(layer, state)
        if self.other_optimizer is not None:
            if clip != 1.0:
                for p in self._other_params():
                    if p.grad is not None:
                        p.grad.mul_(clip)
            self.other_optimizer.step()
        self.steps_taken += 1
        return loss

    def _layer_gradient(self, idx: int, batch: LayerBatch | None, rows: int) -> LayerGradient:
        layer = self.layers[idx]
        if batch is not None:
            X, Z = batch.X(), batch.Z()
        else:  # captured nothing here but elsewhere: take part in the collectives with no rows
            dtype = compute_dtype(layer.A.dtype)
            X = torch.zeros(0, layer.in_features, dtype=dtype, device=layer.A.device)
            Z = torch.zeros(0, layer.out_features, dtype=dtype, device=layer.A.device)
        return LayerGradient(X, Z, self.distributor.grad_coef(), rows, self.distributor.reduce)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    def _all_finite(self, batches: dict[int, LayerBatch]) -> bool:
        checks = [torch.isfinite(t).all() for b in batches.values() for t in (*b.xs, *b.zs)]
        checks += [torch.isfinite(p.grad).all() for p in self._other_params() if p.grad is not None]
        return bool(torch.stack(checks).all()) if checks else True

    def grad_norm(self, grads: dict[int, LayerGradient]) -> float:
        """``||G||_F`` over every LoRA layer's effective weight (``G = P / scaling``) and the other
        trainable parameters' gradients, over all ranks (METHOD.md section 6): exact in one process,
        the distributor's documented estimator across ranks."""
        d = self.distributor
        lora = sum(float(d.lora_norm_sq(self.layers[i], g.X, g.Z, g.coef)) / self.layers[i].scaling ** 2
                   for i, g in grads.items())
        other = torch.zeros((), dtype=torch.float64, device=self.layers[0].A.device)
        for p in self._other_params():
            if p.grad is not None:
                other += p.grad.to(compute_dtype(p.grad.dtype)).square().sum().to(torch.float64)
        if d.other_grads_are_sharded():
            other = d.all_reduce_(other)
        return math.sqrt(lora + float(other))

    def _clip_coefficient(self, grads: dict[int, LayerGradient]) -> float:
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return 1.0
        self.last_grad_norm = self.grad_norm(grads)
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
            "steps_taken": self.steps_taken,
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
        self.steps_taken = state_dict.get("steps_taken", 0)
        self.capture.clear()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model (the optimizer cannot step afterwards)."""
        self.capture.remove()
