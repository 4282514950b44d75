"""A torch optimizer's state saved and restored by position, for engines that key it by tensors of their own.

Under DeepSpeed ZeRO the optimizer's state is keyed by the rank's flat fp32 partitions, which the engine puts into
the param groups around each step (at ZeRO-3 one sub-group at a time, the groups empty between steps), so
``Optimizer.state_dict`` fails or sees nothing. What is the same in every run of one configuration and world size
is the order in which the entries are created. :class:`PositionalState` saves the entries in that order with their
shapes, and a restored list is adopted entry by entry as the engine first hands each partition to ``step`` (the
same order), each checked against its shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class PositionalStateError(ValueError):
    """A saved positional state that does not fit this optimizer's partitions."""


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


class PositionalState:
    """Mixin over a ``torch.optim.Optimizer``: :meth:`positional_state_dict` / :meth:`load_positional_state_dict`."""

    _pending: list[dict[str, Any]] | None = None

    def positional_state_dict(self) -> dict[str, Any]:
        """The state entries in creation order (and any restored ones not yet adopted), their shapes, and the groups'
        hyperparameters."""
        entries = [{"shape": list(p.shape), "state": {k: _to_cpu(v) for k, v in st.items()}}
                   for p, st in self.state.items()]
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "entries": entries + list(self._pending or [])}

    def load_positional_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore :meth:`positional_state_dict`: the hyperparameters now, the entries as the partitions reach
        :meth:`step` (a state that already exists is replaced in order first)."""
        if len(saved["param_groups"]) != len(self.param_groups):
            raise PositionalStateError(f"the saved optimizer has {len(saved['param_groups'])} param groups, this one "
                                       f"{len(self.param_groups)}")
        for group, hyper in zip(self.param_groups, saved["param_groups"]):
            group.update(hyper)
        entries = list(saved["entries"])
        for p in list(self.state):
            if entries:
                self._adopt(p, entries.pop(0))
        self._pending = entries

    def _adopt(self, p: torch.Tensor, entry: dict[str, Any]) -> None:
        if list(p.shape) != entry["shape"]:
            raise PositionalStateError(f"a saved optimizer state of shape {entry['shape']} met a partition of shape "
                                       f"{list(p.shape)}: another model, adapter, ZeRO configuration or world size")
        self.state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in entry["state"].items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._pending:
            for p in (p for g in self.param_groups for p in g["params"]):
                if p not in self.state and self._pending:
                    self._adopt(p, self._pending.pop(0))
        return super().step(closure)
