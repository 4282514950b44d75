"""Data parallelism over a torch.distributed process group (DDP, and the base of the engine
distributors): exact LoRSum by all-reducing thin products, optional layer-sharded state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..lora_layers import LoRALayer
from ..product_buckets import AsyncReduce, Waitable
from .base import DEFAULT_NORM_PROBES, Distributor


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

    The clipping norm is always the random-sign sketch here (an exact norm would need every rank's rows):
    ``norm_probes`` from :meth:`bind`, 32 when the optimizer asks for 0.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, shard_state: bool = False):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DDPDistributor needs torch.distributed initialized (init_process_group) first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shard_state = shard_state
        self._owners: list[int] = []
        # each layer's state tensors as its first init() made them: later steps receive into buffers of that layout
        self._state_layouts: dict[int, dict[str, tuple[torch.Size, torch.dtype, torch.device]]] = {}
        # bytes this rank handed to collectives (optimizer traffic only; the engine's own not counted), and how
        # many calls; "factor_read": the engine's factors read whole where that is a collective (sharded masters)
        self.comm_bytes = {"all_reduce": 0, "broadcast": 0, "factor_read": 0}
        self.comm_calls = {"all_reduce": 0, "broadcast": 0, "factor_read": 0}
        self._async_group: dist.ProcessGroup | None = None  # the optimizer's own group (async_reduce), once asked

    def bind(self, layers: Sequence[LoRALayer], *, norm_probes: int = 0,
             factors: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        super().bind(layers, norm_probes=norm_probes or DEFAULT_NORM_PROBES, factors=factors)
        sizes = [(layer.in_features + layer.out_features) * (layer.rank + 2) for layer in layers]
        self._owners = balanced_owners(sizes, self.world_size)

    # ---- gradients -------------------------------------------------------------------------------
    def lora_grads_are_whole(self) -> bool:
        return True  # DDP all-reduces and averages every gradient (checked once against the products)

    def grad_coef(self) -> float:
        return 1.0 / self.world_size

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._all_reduce if self.world_size > 1 else None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.contiguous()  # collectives read and write memory order
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        self.comm_bytes["all_reduce"] += buf.numel() * buf.element_size()
        self.comm_calls["all_reduce"] += 1
        return buf

    def async_reduce(self) -> AsyncReduce | None:
        return self._all_reduce_async if self.world_size > 1 else None

    def _all_reduce_async(self, t: torch.Tensor) -> Waitable:
        if not t.is_contiguous():
            raise ValueError("an asynchronous all-reduce sums in place: give a contiguous tensor")
        if self._async_group is None:
            # the same ranks as the engine's group, in a group of its own: the optimizer's collectives started in the
            # backward pass then never interleave with the engine's (ZeRO's reduce-scatters, FSDP2's) on one group.
            # Made at the first sum (every rank starts the same first bucket), not when the optimizer is built: an
            # optimizer built on some ranks only must not wait for the others
            ranks = dist.get_process_group_ranks(self.group if self.group is not None else dist.group.WORLD)
            self._async_group = dist.new_group(ranks=ranks, use_local_synchronization=True)
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._async_group, async_op=True)
        self.comm_bytes["all_reduce"] += t.numel() * t.element_size()
        self.comm_calls["all_reduce"] += 1
        return work

    def _count_factor_reads(self, tensors: Sequence[torch.Tensor]) -> None:
        """Count ``tensors``, just read whole through a collective of the engine, as optimizer traffic."""
        self.comm_calls["factor_read"] += len(tensors)
        self.comm_bytes["factor_read"] += sum(t.numel() * t.element_size() for t in tensors)

    def sketches_norm(self) -> bool:
        return self.world_size > 1  # one rank: exact

    # ---- state -----------------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "sharded": self.shard_state and self.world_size > 1,
                "owners": list(self._owners)}

    def owns(self, layer: LoRALayer) -> bool:
        return not self.shard_state or self.world_size == 1 or self._owners[layer.index] == self.rank

    def owner_rank(self, layer: LoRALayer) -> int:
        return self._owners[layer.index]

    def materialize_states(self, items: Sequence[tuple[LoRALayer, dict[str, Any], Callable[[], dict]]], *,
                           known: Callable[[LoRALayer], dict[str, torch.Tensor]] | None = None) -> None:
        if not self.shard_state or self.world_size == 1:
            return super().materialize_states(items)
        received: dict[int, list[tuple[dict[str, Any], set[str]]]] = {}  # owner rank -> (state, keys not sent)
        for layer, state, init in items:
            first_use = "initialized" not in state
            held = known(layer) if known is not None and not first_use else {}
            if first_use or not self.owns(layer):
                # deterministic on every rank: the first time it *is* the state; later buffers to receive it, laid
                # out as init() made it (every tensor is then broadcast or held: init's values would be overwritten)
                scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
                layout = None if first_use else self._state_layouts.get(layer.index)
                if layout is None:
                    fresh = init()
                    self._state_layouts[layer.index] = {k: (v.shape, v.dtype, v.device) for k, v in fresh.items()
                                                        if isinstance(v, torch.Tensor)}
                else:
                    fresh = {k: torch.empty(shape, dtype=dtype, device=device)
                             for k, (shape, dtype, device) in layout.items()}
                state.update(fresh)
                state.update(scalars)
                # (what every rank holds alike: not sent)
                state.update({k: v.clone(memory_format=torch.contiguous_format) for k, v in held.items()})
                state["initialized"] = True
            if not first_use:
                received.setdefault(self.owner_rank(layer), []).append((state, set(held)))
        # one broadcast per owner rank (and dtype) for all its layers, whatever their number
        for owner in sorted(received):
            src = dist.get_global_rank(self.group, owner) if self.group else owner
            slots = [(state, key) for state, held in received[owner]
                     for key in sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in held)]
            by_dtype: dict[torch.dtype, list[tuple[dict[str, Any], str]]] = {}
            for state, key in slots:
                by_dtype.setdefault(state[key].dtype, []).append((state, key))
            for dtype in sorted(by_dtype, key=str):
                group = by_dtype[dtype]
                flat = torch.cat([state[key].reshape(-1) for state, key in group])
                dist.broadcast(flat, src=src, group=self.group)
                self.comm_bytes["broadcast"] += flat.numel() * flat.element_size()
                self.comm_calls["broadcast"] += 1
                offset = 0
                for state, key in group:
                    n = state[key].numel()
                    state[key] = flat[offset: offset + n].view_as(state[key]).clone()
                    offset += n

    def adopt_state(self, layer: LoRALayer, state: dict[str, Any]) -> None:
        # A loaded state is past its first use whatever layout saved it (an unsharded checkpoint has no
        # "initialized" key): the owner keeps it, the others receive it by broadcast when it is used.
        if self.shard_state and self.world_size > 1:
            state["initialized"] = True
        self.release_state(layer, state)

    def release_state(self, layer: LoRALayer, state: dict[str, Any]) -> None:
        if self.owns(layer):
            return
        for key in [k for k, v in state.items() if isinstance(v, torch.Tensor)]:
            del state[key]
