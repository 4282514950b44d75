"""Where a step's starting LoRA factors come from, and whether they still are what the engine holds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import Distributor
from ..lora_layers import LoRALayer
from ..ops.rounds import host_tensor
from ..products import StaleFactorsError

logger = logging.getLogger(__name__)

Factors = tuple[torch.Tensor, ...]  # a layer's trainable factors, as its method declares them: (A, B) by default


class FactorSource:
    """The factors each layer's step starts from, in one of three ways:

    - cache-free steps: the factors the capture's thin products were taken at (``capture.factors``); a change of
      the engine's factors behind the optimizer is an error (:meth:`stale_flags`, :meth:`raise_stale`);
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

    def changed_flags(self) -> torch.Tensor:
        """Per layer (float64, on the device, not read): 1 where this rank's part of the engine's factors differs from
        the copy, else 0 (and 0 for a layer without a copy); the step's flags all-reduce sums them over ranks."""
        copy = self.copy or {}
        return self._flags_of({i: copy[i] for i in range(len(self.layers)) if i in copy})

    def stale_flags(self) -> torch.Tensor:
        """Cache-free steps, per layer (float64, on the device, not read): 1 where this rank's part of the engine's
        factors differs from those the products were taken at, else 0 (and 0 for a layer without them); the step's
        flags all-reduce sums them over ranks."""
        probes = self.capture.probes
        return self._flags_of({i: probes.step_factors(i) for i in range(len(self.layers)) if i in probes})

    def _flags_of(self, given: dict[int, Factors]) -> torch.Tensor:
        """:meth:`~psilora_ds.distributed.base.Distributor.factors_changed` of the layers in ``given`` against those
        factors, as one flag per layer of the model."""
        device = self.layers[0].A.device
        if not given:
            return torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        flags = self.distributor.factors_changed([self.layers[i] for i in given], self.masters,
                                                 list(given.values())).to(device)
        if len(given) == len(self.layers):  # (every layer, in order: no index to move to the device)
            return flags
        out = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        out[host_tensor(list(given), device, torch.int64)] = flags  # (no synchronizing copy on a GPU)
        return out

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

    def raise_stale(self, stale: list[int], here: torch.Tensor) -> None:
        """Raise, on every rank: ``stale`` are the layers stepped this step whose factors are stale on some rank
        (:meth:`stale_flags` summed over ranks), ``here`` this rank's :meth:`stale_flags`; the message names the layer
        where this rank holds it stale."""
        mine = here.tolist()
        local = [idx for idx in stale if mine[idx] > 0]
        if local:
            raise self.capture.probes.stale(local[0])
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
