"""What the LoRSum methods (PSI-LoRA, Scaled PSI-LoRA, preconditioned LoRA) share over the base: the proximal
weight and the spectral first step (METHOD.md sections 2 and 5)."""

from __future__ import annotations

import logging
from typing import Any

from ..products import HookStatistics
from .base import LoRAOptimizer

logger = logging.getLogger(__name__)

# Proximal weights are floored here: lr can be 0 (warm-up), and lam must stay > 0.
MIN_PROX_WEIGHT = 1e-12


class LoRSumOptimizer(LoRAOptimizer):
    """A method whose steps are LoRSum solves with the proximal weight ``lam = lr * prox`` (its group has ``prox``),
    and whose run may start with the spectral first step (its group's ``first_step_iters``, LoRA-One): that many
    inner iterations at the proximal floor on the run's first step with ``lr > 0``. Cache-free methods keep no rows
    for it: their hooks take a two-sided sketch of that step's gradient instead, reconstructed to rank r
    (:meth:`hook_statistics`, :func:`~psilora_ds.ops.sketch_svd.spectral_step_from_sketch`)."""

    spectral_done: bool = False  # the spectral first step has been taken
    _warned_unsketched: bool = False

    def spectral_pending(self, group: dict[str, Any]) -> bool:
        """The run asks for the spectral first step and has not taken it yet."""
        return group.get("first_step_iters") is not None and not self.spectral_done

    def spectral_iters(self, group: dict[str, Any]) -> int | None:
        """The inner iterations of the spectral first step when this step is it, else None: the run's first step
        with ``lr > 0`` (a warm-up schedule's first step has lr 0, and a spectral step of length 0 would leave
        peft's ``B = 0`` start as it is) and, cache-free, whose sketch the hooks took."""
        if not self.spectral_pending(group) or group["lr"] <= 0:
            return None
        if self.cache_free and not self.capture.sketched:
            if not self._warned_unsketched:
                self._warned_unsketched = True
                logger.warning("the spectral first step waits one step: this step's lr became > 0 after its "
                               "backward pass, which took no sketch for it (set the lr before the forward pass)")
            return None
        return group["first_step_iters"]

    def prox_weight(self, group: dict[str, Any]) -> float:
        """``lam = lr * prox``, floored (METHOD.md section 2)."""
        return max(group["lr"] * group["prox"], MIN_PROX_WEIGHT)

    def hook_statistics(self, group: dict[str, Any]) -> HookStatistics:
        """The two-sided sketch while the spectral first step is pending and this step's lr is > 0: a step at lr 0
        (warm-up) captures nothing for it."""
        return HookStatistics(gradient_sketch=self.spectral_pending(group) and group["lr"] > 0)

    def on_step_applied(self, group: dict[str, Any]) -> None:
        if self.spectral_iters(group) is not None:
            self.spectral_done = True

    def extra_state(self) -> dict[str, Any]:
        return {"spectral_done": self.spectral_done}

    def load_extra_state(self, state_dict: dict[str, Any]) -> None:
        self.spectral_done = state_dict.get("spectral_done", self.steps_taken > 0)
