"""Where a step's starting LoRA factors come from, and whether they still are what the engine holds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import Distributor
from ..lora_layers import LoRALayer
from ..products import StaleFactorsError

logger = logging.getLogger(__name__)

Factors = tuple[torch.Tensor, ...]  # a layer's trainable factors, as its method declares them: (A, B) by default


class FactorSource:
    """The factors each layer's step starts from, in one of three ways:

    - cache-free steps: the factors the capture's thin products were taken at (``capture.factors``); a change of
      the engine's factors behind the optimizer is an error (:meth:`stale_layers`, :meth:`raise_if_stale`);
    - cached steps on engines whose factor reads are collectives (ZeRO-3, FSDP2): the optimizer's own copy
      (:attr:`copy`), taken by :meth:`refresh_copy` and after each step (:meth:`record`), checked against the engine's
      without communication in the step's flags (:meth:`changed_flags`) and read again where it changed
      (:meth:`reread`);
    - otherwise: the engine's, read at each step.

    ``group``: the optimizer's LoRA param group (its ``params`` are the masters the distributor reads).
    """

    def __init__(self, layers: Sequence[LoRALayer], group: dict[str, Any], distributor: Distributor, capture: Any,
                 cache_free: bool, momentum_copies: bool = True):
        self.layers = layers
        self.group = group
        self.distributor = distributor
        self.capture = capture
        self.cache_free = cache_free
        self.copy: dict[int, Factors] | None = None  # None: read from the engine (or the capture) at each step
        # cached steps with layer-sharded state: each layer's momentum factors (M_A, M_B) as every rank computed them at
        # the last step (every rank computes every layer's update), so that the owner need not broadcast them to the
        # others at the next one (the cache-free path holds them as the capture's probe factors); None on the owner
        # (its state holds them), the same layers on every rank
        self.momentum: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._keeps_momentum = momentum_copies and not cache_free and bool(distributor.layout().get("sharded"))

    @property
    def masters(self) -> list[torch.Tensor]:
        return self.group["params"]

    def read_copy(self, layer: LoRALayer) -> Factors:
        """The engine's factors of ``layer``, as the optimizer's own copy (a collective where they are sharded)."""
        return tuple(f.detach().clone() for f in self.distributor.read_factors(layer, self.masters))

    def refresh_copy(self) -> None:
        """Cached steps: take the copy again where the engine's reads are collectives (every rank calls it); forget the
        momentum copies (the state may have been loaded: the owners broadcast it at the next step)."""
        self.momentum = {}
        if not self.distributor.reads_factors_collectively(self.masters):
            self.copy = None
            return
        copy = {}
        for layer in self.layers:
            factors = self.read_copy(layer)
            if factors[0].shape == (layer.rank, layer.in_features):  # (not partitioned from birth, no engine yet)
                copy[layer.index] = factors
        self.copy = copy
        self.distributor.factors_synced(self.masters)

    def start(self, layer: LoRALayer) -> Factors:
        """The factors a step of ``layer`` starts from (a copy is checked against the engine by the step's plan).
        Cache-free steps: those the capture's products were taken at (with any core between them)."""
        if self.cache_free:
            return self.capture.probes.step_factors(layer.index)
        if self.copy is not None and layer.index in self.copy:
            return self.copy[layer.index]
        return self.distributor.read_factors(layer, self.masters)

    def changed_flags(self) -> tuple[list[int], torch.Tensor]:
        """The layers of the copy and, per layer, whether this rank's part of the engine's factors differs from it
        (local; the step's flags all-reduce sums them over ranks)."""
        idxs = list(self.copy or {})
        if not idxs:
            return [], torch.zeros(0, dtype=torch.float64)
        flags = self.distributor.factors_changed([self.layers[i] for i in idxs], self.masters,
                                                 [self.copy[i] for i in idxs])
        return idxs, flags

    def reread(self, changed: list[int]) -> None:
        """Cached steps: the layers whose engine factors changed since the copy was taken on some rank (e.g.
        ``engine.load_checkpoint``) are read again, by every rank in the same order (collectives)."""
        if not changed:
            return
        logger.info("LoRA factors of %d layers changed outside the optimizer (a checkpoint loaded?): read again",
                    len(changed))
        for idx in changed:
            self.copy[idx] = self.read_copy(self.layers[idx])
        self.distributor.factors_synced(self.masters)

    def stale_layers(self, rows: list[float]) -> list[int]:
        """Cache-free steps: the layers (captured on some rank) whose engine factors, as far as this rank holds them,
        differ from those the products were taken at (local: the callers sum the count over ranks, so that all
        raise)."""
        idxs = [idx for idx, n in enumerate(rows) if n > 0]
        if not idxs:
            return []
        changed = self.distributor.factors_changed([self.layers[idx] for idx in idxs], self.masters,
                                                   [self.capture.probes.step_factors(idx) for idx in idxs]).tolist()
        return [idx for idx, c in zip(idxs, changed) if c > 0]

    def raise_if_stale(self, stale: list[int], count: torch.Tensor) -> None:
        """``count``: the stale layers summed over ranks."""
        if stale:
            raise self.capture.probes.stale(stale[0])
        if float(count.reshape(-1)[0]) > 0:
            raise StaleFactorsError(
                "the LoRA factors changed outside the optimizer after its last step on another rank (an adapter or "
                "checkpoint loaded into the model?): call optimizer.refresh_factors() after changing factors, or "
                "build the optimizer with cache_free=False")

    def diverged(self) -> bool:
        """Whether some layer's factors, as the next step would start from them, are not finite on some rank (the
        skipped-step path only: every rank is here together; one all-reduce)."""
        bad = []
        for layer in self.layers:
            bad.append(~torch.stack([torch.isfinite(f).all() for f in self.start(layer)]).all())
        flag = (torch.stack(bad).any() if bad else torch.zeros((), dtype=torch.bool)).to(
            device=self.layers[0].A.device, dtype=torch.float64).reshape(1)
        return float(self.distributor.all_reduce_(flag)[0]) > 0

    def record(self, idx: int, factors: Factors, momentum: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """A step wrote ``factors`` into the engine: the next step starts from them (cache-free: its products are taken
        at them, ``(A, B)``, and at the momentum factors; a core between them is held with them)."""
        if self.cache_free:
            self.capture.probes.set(idx, factors, momentum)
            return
        if self.copy is not None and idx in self.copy:
            self.copy[idx] = tuple(factors)  # (the dtype read: what the engine now holds)
        if momentum is not None and self._keeps_momentum:
            owner = self.distributor.owns(self.layers[idx])
            self.momentum[idx] = None if owner else tuple(m.detach().clone() for m in momentum)

    def known_momentum(self, idx: int, own: tuple[torch.Tensor, torch.Tensor] | None
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``idx``'s momentum factors ``(M_A, M_B)`` as every rank holds them after the last step (cache-free: the
        capture's probe copy; cached: the copy, or on the owner ``own``, its state's), or None (on every rank)."""
        if self.cache_free:
            return self.capture.probes.momentum(idx)
        if idx not in self.momentum:
            return None
        return own if self.momentum[idx] is None else self.momentum[idx]

    @property
    def momentum_nbytes(self) -> int:
        """Bytes of the momentum copies of other ranks' layers held for cached steps."""
        return sum(t.numel() * t.element_size() for pair in self.momentum.values() if pair is not None for t in pair)
