"""Data parallelism over a torch.distributed process group (DDP, and the base of the engine
distributors): exact LoRSum by all-reducing thin products, optional layer-sharded state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..lora_layers import LoRALayer
from .base import Distributor

logger = logging.getLogger(__name__)

NORM_SKETCH_SEED = 0x7A5C


def balanced_owners(sizes: list[int], world_size: int) -> list[int]:
    """Assign items to ranks, largest first to the least-loaded rank (LPT): per-rank totals stay
    within one item of total / world_size."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world_size), key=lambda k: load[k])
        owners[i] = rank
        load[rank] += sizes[i]
    return owners


class DDPDistributor(Distributor):
    """Plain data parallelism (e.g. ``torch.nn.parallel.DistributedDataParallel``).

    Each rank captures ``X_k``, ``Z_k`` of its own micro-batches; the engine averages gradients, so
    this rank's share of ``P`` is ``Z_k^T X_k / world_size``. Every thin product of LoRSum and every
    metric statistic is all-reduced (METHOD.md section 6), so all ranks compute identical factors.

    Args:
        group: the data-parallel process group (default: the world).
        shard_state: keep each layer's optimizer state (momentum factors, metric diagonals) only on
            its owner rank, layers balanced by size; the owner broadcasts it when the layer is updated.
        norm_probes: Gaussian probes of the full-gradient norm sketch used for clipping (see
            :meth:`lora_norm_sq`).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, shard_state: bool = False, norm_probes: int = 32):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DDPDistributor needs torch.distributed initialized (init_process_group) first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shard_state = shard_state
        self.norm_probes = norm_probes
        self._owners: list[int] = []
        # bytes this rank handed to collectives (optimizer traffic only; the engine's own not counted)
        self.comm_bytes = {"all_reduce": 0, "broadcast": 0}

    def bind(self, optimizer) -> None:
        super().bind(optimizer)
        sizes = [(layer.in_features + layer.out_features) * (layer.rank + 2) for layer in optimizer.layers]
        self._owners = balanced_owners(sizes, self.world_size)

    # ---- gradients -------------------------------------------------------------------------------
    def grad_coef(self) -> float:
        return 1.0 / self.world_size

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._all_reduce if self.world_size > 1 else None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.contiguous()  # collectives read and write memory order
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        self.comm_bytes["all_reduce"] += buf.numel() * buf.element_size()
        return buf

    def lora_norm_sq(self, layer: LoRALayer, grad) -> torch.Tensor:
        """Unbiased sketch of ``||sum_k coef Z_k^T X_k||_F^2``: with ``Omega`` (n x k) standard
        Gaussian, drawn from a seed shared by all ranks, ``E ||P Omega||_F^2 / k = ||P||_F^2``.
        ``P Omega = sum_k Z_k^T (X_k Omega) (+ P_k Omega)`` costs one ``m x k`` all-reduce; no
        activations move.
        The relative standard deviation is ``sqrt(2 sum s_i^4 / k) / sum s_i^2 <= sqrt(2 / k)``
        (s_i: singular values of P), far below the bound for a gradient of high effective rank.
        """
        if self.world_size == 1:
            return super().lora_norm_sq(layer, grad)  # exact
        step = self.optimizer.steps_taken
        gen = torch.Generator().manual_seed(NORM_SKETCH_SEED + 1_000_003 * step + layer.index)
        X, Z = grad.X, grad.Z
        omega = torch.randn(X.shape[1], self.norm_probes, generator=gen, dtype=torch.float64)
        omega = omega.to(device=X.device, dtype=torch.float32 if X.dtype != torch.float64 else torch.float64)
        Y = Z.to(omega.dtype).T @ (X.to(omega.dtype) @ omega)
        if grad.dense is not None:
            Y += grad.dense.to(omega.dtype) @ omega
        return self._all_reduce(Y).square().sum() * (grad.coef**2 / self.norm_probes)

    # ---- state -----------------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "sharded": self.shard_state and self.world_size > 1,
                "owners": list(self._owners)}

    def owns(self, layer: LoRALayer) -> bool:
        return not self.shard_state or self.world_size == 1 or self._owners[layer.index] == self.rank

    def owner_rank(self, layer: LoRALayer) -> int:
        return self._owners[layer.index]

    def materialize_state(self, layer: LoRALayer, state: dict[str, Any], init: Callable[[], dict]) -> None:
        if not self.shard_state or self.world_size == 1:
            return super().materialize_state(layer, state, init)
        first_use = "initialized" not in state
        if first_use or not self.owns(layer):
            # deterministic on every rank: the first time it *is* the state; later a buffer to receive it
            scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
            state.update(init())
            state.update(scalars)
            state["initialized"] = True
        if not first_use:
            src = dist.get_global_rank(self.group, self.owner_rank(layer)) if self.group else self.owner_rank(layer)
            for key in sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)):
                buf = state[key].contiguous()  # collectives read and write memory order
                dist.broadcast(buf, src=src, group=self.group)
                self.comm_bytes["broadcast"] += buf.numel() * buf.element_size()
                state[key] = buf

    def release_state(self, layer: LoRALayer, state: dict[str, Any]) -> None:
        if self.owns(layer):
            return
        for key in [k for k, v in state.items() if isinstance(v, torch.Tensor)]:
            del state[key]
