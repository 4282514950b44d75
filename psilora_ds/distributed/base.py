"""Distributors: what a parallel engine changes for a PSI-LoRA optimizer (METHOD.md section 6).

A distributor answers, for one engine: where a layer's (master) factors are read and written, how a
captured ``Z`` is scaled into this rank's share of the averaged gradient, how thin products and
statistics are summed over the data-parallel ranks, which rank keeps which layer's state, and how
the full-gradient norm is obtained. The optimizers never branch on the engine; they call these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..lora_layers import LoRALayer
from ..ops import frobenius_sq

if TYPE_CHECKING:
    from ..optim.base import LoRAOptimizer
    from ..optim.gradient import LayerGradient


class Distributor:
    """One process: no collectives, every layer's state is local, the norm is exact.

    The master factors are the tensors in the optimizer's LoRA param group (the model's parameters,
    or the fp32 masters an engine put there in their place at ZeRO stage 0).
    """

    world_size: int = 1
    rank: int = 0

    def bind(self, optimizer: LoRAOptimizer) -> None:
        """Called once by the optimizer that uses this distributor."""
        self.optimizer = optimizer
        self.n_lora_params = 2 * len(optimizer.layers)

    # ---- factors ---------------------------------------------------------------------------------
    def read_factors(self, layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.optimizer.lora_group["params"]
        if len(params) != self.n_lora_params:
            raise RuntimeError(
                f"the LoRA param group holds {len(params)} tensors instead of {self.n_lora_params}: an engine "
                "(DeepSpeed ZeRO >= 1?) flattened it; build the engine with psilora_ds.deepspeed.initialize"
            )
        return params[2 * layer.index], params[2 * layer.index + 1]

    def write_factors(self, layer: LoRALayer, A: torch.Tensor, B: torch.Tensor) -> None:
        A_master, B_master = self.read_factors(layer)
        A_master.copy_(A)
        B_master.copy_(B)

    # ---- gradients -------------------------------------------------------------------------------
    def grad_coef(self) -> float:
        """Multiplier turning this rank's captured ``Z`` into its share of the engine's gradient."""
        return 1.0

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Sum over data-parallel ranks, in place (``None``: one process)."""
        return None

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.reduce is None else self.reduce(t)

    def layout(self) -> dict[str, Any]:
        """What a checkpoint of the optimizer state depends on."""
        return {"world_size": self.world_size, "sharded": False}

    def lora_norm_sq(self, layer: LoRALayer, grad: LayerGradient) -> torch.Tensor:
        """``||P||_F^2`` of the layer's whole gradient: exact in one process (Gram trick on the rows,
        or the dense store when the rows were folded into it)."""
        if grad.dense is not None:
            return grad.local_dense().square().sum() * grad.coef**2
        return frobenius_sq(grad.Z, grad.X) * grad.coef**2

    def other_grads_are_sharded(self) -> bool:
        """Whether each rank holds only a shard of the non-LoRA gradients (their norms add up)."""
        return False

    # ---- state -----------------------------------------------------------------------------------
    def owns(self, layer: LoRALayer) -> bool:
        return True

    def materialize_state(self, layer: LoRALayer, state: dict[str, Any], init: Callable[[], dict]) -> None:
        """Make ``state`` the layer's full state on this rank (initializing it on first use)."""
        if not state:
            state.update(init())

    def release_state(self, layer: LoRALayer, state: dict[str, Any]) -> None:
        """Drop what this rank does not keep between steps."""
