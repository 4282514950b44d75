"""Steps that would make a weight or an optimizer state non-finite are not applied, for torch optimizers too.

:func:`skipping_non_finite` makes a subclass of a ``torch.optim.Optimizer`` class whose ``step`` keeps a copy of
the parameters and the state it updates, steps, and, when any of them came out non-finite (on any rank: one
all-reduce of one number), puts the copy back and counts the step in ``skipped_steps``. It is how the recipe's
baselines (AdamW, SGD, peft's LoRA+ and Riemannian wrappers) get the guarantee PSI-LoRA's optimizers give
(:class:`psilora_ds.optim.base.LoRAOptimizer` checks its update the same way). The copy costs one more set of
the stepped parameters and their state for the duration of a step: meant for adapters, not full fine-tuning.
Under DeepSpeed ZeRO the parameters it sees are the rank's flat fp32 partitions; every rank steps together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)


def copy_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state entry with its tensors copied (to undo a step)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def any_non_finite(tensors: Iterable[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """A 0-d float64 tensor: 1 when some entry of ``tensors`` is a NaN or an infinity, else 0; of a DTensor, this
    rank's shard (agree over ranks with :func:`any_rank`). On CUDA, from their largest absolute value
    (``torch.nn.utils.get_total_norm`` with the infinity norm: one fused kernel per dtype, not one per tensor);
    elsewhere from one float32 sum per tensor (a non-finite entry makes it non-finite; on the CPU a sum is ~10x faster
    than a largest absolute value), where finite values summing past float32's range (3.4e38) read as non-finite too."""
    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)  # (FSDP2: this rank's shard)
    floats = [t.detach() for t in local if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.zeros((), dtype=torch.float64, device=device)
    if all(t.is_cuda for t in floats):
        largest = torch.nn.utils.get_total_norm(floats, float("inf"), foreach=True)
        return (~torch.isfinite(largest)).to(torch.float64)
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in floats]
    return (~torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]))).any().to(torch.float64)


def any_rank(count: torch.Tensor) -> bool:
    """Whether ``count`` is positive on some rank (an all-reduce when a process group runs)."""
    if dist.is_initialized():
        count = count.to("cuda" if dist.get_backend() == "nccl" else "cpu").reshape(1)
        dist.all_reduce(count)
    return bool(count.item() > 0)


def update_is_finite(new_factors: dict[Any, tuple[torch.Tensor, ...]] | None, states: list[dict],
                     device: torch.device) -> bool:
    """Whether a computed LoRA update (None: it failed on non-finite values; else the new factors by layer, or by stack
    of layers) leaves every new factor and state value finite (finite gradients can still overflow in the products or
    the metrics). No collective: every rank computes
    every layer's update from the same reduced products and states (the engines write each rank's shard of it), so
    every rank reaches the same verdict."""
    if new_factors is None:
        return False
    tensors = [t for factors in new_factors.values() for t in factors]
    tensors += [v for state in states for v in state.values() if isinstance(v, torch.Tensor)]
    return any_non_finite(tensors, device).item() == 0


class NonFiniteGuard:
    """Mixin over a ``torch.optim.Optimizer``: :meth:`step` is undone when it leaves a non-finite value.

    With ``keep_undo = True`` (set by a PSI-LoRA optimizer over its other-parameter optimizer) the copy of a step
    that was applied is kept until :meth:`release_undo`, so that :meth:`undo_last_step` can take it back when the
    LoRA half of the same step turns out non-finite: the whole step is applied or none of it."""

    skipped_steps: int = 0
    last_step_skipped: bool = False
    keep_undo: bool = False
    _undo: tuple[list, list, dict] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        params = [p for g in self.param_groups for p in g["params"]]
        kept_params = [p.detach().clone() for p in params]
        kept_state = {p: copy_state(self.state[p]) for p in params if p in self.state}
        loss = super().step(closure)
        after = [*params, *(v for p in params for v in self.state.get(p, {}).values() if isinstance(v, torch.Tensor))]
        self.last_step_skipped = any_rank(any_non_finite(after, params[0].device if params else None))
        self._undo = (params, kept_params, kept_state)
        if self.last_step_skipped:
            self.undo_last_step()
            self.skipped_steps += 1
            logger.warning("the update would make a weight or optimizer state non-finite: step not applied, on all "
                           "ranks (%d so far)", self.skipped_steps)
        elif not self.keep_undo:
            self.release_undo()
        return loss

    @torch.no_grad()
    def undo_last_step(self) -> None:
        """Put back the parameters and state as they were before the last :meth:`step` (if its copy is kept)."""
        if self._undo is None:
            return
        params, kept_params, kept_state = self._undo
        for p, kept in zip(params, kept_params):
            p.copy_(kept)
        for p in params:
            if p in kept_state:
                self.state[p] = kept_state[p]
            else:
                self.state.pop(p, None)
        self._undo = None

    def release_undo(self) -> None:
        """Drop the copy of the last step."""
        self._undo = None


def skipping_non_finite(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` with :class:`NonFiniteGuard`'s step and :class:`~psilora_ds.optim.positional_state.PositionalState`'s
    checkpoint methods (how the recipe saves it under ZeRO); same constructor and behaviour otherwise."""
    from .positional_state import PositionalState

    return type(f"NonFinite{cls.__name__}", (PositionalState, NonFiniteGuard, cls), {
        "__module__": __name__, "__doc__": f"{cls.__name__}, skipping non-finite updates."})
