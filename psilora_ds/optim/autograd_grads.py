"""Autograd's LoRA gradients in place of a cache-free step's products at its own factors (METHOD.md section 6).

The backward pass computes ``A.grad = B^T P`` and ``B.grad = P A^T`` whatever the optimizer does, and a data-parallel
engine reduces them over ranks. Where they are whole and reduced (one process, DDP), the capture hooks need not take
those products again: a cache-free step then takes only the momentum factors' products (and the statistics and
sketches), ``r`` fewer columns on each side per token and layer, and sums no ``r (m + n)`` per layer over ranks.

That the engine's gradients are what they must be (this rank's share averaged over the ranks as the distributor's
``grad_coef`` says, identical on every rank) is checked once, on the first cache-free step, against the products the
hooks then still take: any difference beyond rounding (``TOLERANCE``: bf16 autocast's matrix products included) and
the steps keep taking the products, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from ..distributed import Distributor
from ..lora_layers import LoRALayer
from ..products import LayerProducts, ProductCapture

logger = logging.getLogger(__name__)

# Relative Frobenius difference allowed between autograd's LoRA gradients and the captured products: fp32 products
# differ by summation order (~1e-6); under bf16 autocast the backward's own matrix products round to 8 bits (~4e-3).
TOLERANCE = 2e-2


def lora_grads(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A.grad, B.grad)`` of ``layer`` when they are plain fp32/fp64 tensors (not DTensor shards, not half
    precision), else None."""
    gA, gB = layer.A.grad, layer.B.grad
    plain = type(gA) is torch.Tensor and type(gB) is torch.Tensor
    if plain and gA.dtype in (torch.float32, torch.float64) and gB.dtype == gA.dtype:
        return gA, gB
    return None


class AutogradGradients:
    """Whether a cache-free optimizer's steps take autograd's LoRA gradients for the products at ``(A, B)``: sets the
    capture's ``autograd_reuse`` (``"verify"`` where the distributor's engine leaves whole reduced gradients, else
    ``"off"``), verifies on the first step, and hands the gradients to the steps that left those products out."""

    def __init__(self, layers: Sequence[LoRALayer], distributor: Distributor, capture: ProductCapture, *,
                 enabled: bool):
        self.layers = layers
        self.distributor = distributor
        self.capture = capture
        # (LoRA factors kept in half precision have half-precision gradients: their products stay in the hooks, fp32)
        full = all(f.dtype in (torch.float32, torch.float64) for layer in layers for f in (layer.A, layer.B))
        capture.autograd_reuse = "verify" if enabled and full and distributor.lora_grads_are_whole() else "off"
        self._taken: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def reusing(self) -> bool:
        """Whether the step being planned left out the products at ``(A, B)``."""
        return self.capture.reusing_autograd()

    def take(self) -> None:
        """At a step's planning, while autograd's gradients may be used: keep this step's ``(A.grad, B.grad)`` of every
        layer and clear them on the model, so that the next step's start from zero as its products do (the capture
        was emptied for this step whatever becomes of it: applied, skipped or undone)."""
        self._taken = {}
        if self.capture.autograd_reuse == "off":
            return
        for idx, layer in enumerate(self.layers):
            pair = lora_grads(layer)
            if pair is not None:
                self._taken[idx] = pair
            layer.A.grad = layer.B.grad = None

    def local(self, idxs: Iterable[int]) -> list[torch.Tensor]:
        """The taken gradients of the layers ``idxs`` (for the step's finiteness check)."""
        return [g for idx in idxs if idx in self._taken for g in self._taken[idx]]

    def pairs(self, idxs: Iterable[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``(A.grad, B.grad)`` of every layer in ``idxs``, on a step that took no products at ``(A, B)``."""
        for idx in idxs:
            if idx not in self._taken:
                raise RuntimeError(
                    f"{self.layers[idx].name}: this cache-free step took no products at (A, B) because autograd's "
                    "LoRA gradients stand for them, but A.grad/B.grad are missing or not fp32 (zeroed or cast between "
                    "backward and step?); build the optimizer with reuse_autograd_grads=False")
        return {idx: self._taken[idx] for idx in idxs}

    def verify(self, products: dict[int, LayerProducts], coef: float) -> None:
        """On a step that still took the products at ``(A, B)`` (summed over ranks, ``coef`` the engine's share):
        whether autograd's gradients equal them on every layer and are the same on every rank; from the next step on
        they stand for those products, or never (one warning)."""
        if self.capture.autograd_reuse != "verify" or self.reusing or not products:
            return
        worst, missing = 0.0, []
        checksum = torch.zeros((), dtype=torch.float64)
        for idx, p in products.items():
            layer = self.layers[idx]
            pair = self._taken.get(idx)
            if pair is None:
                missing.append(layer.name)
                continue
            r = layer.rank
            for grad, taken in ((pair[0], p.left[:r]), (pair[1], p.right[:, :r])):
                want = taken.double() * coef
                diff = (grad.double() - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny)
                worst = max(worst, float(diff))
                checksum += grad.double().square().sum().cpu()
        # one sum over ranks: how many ranks miss a gradient or differ, and (sum c, sum c^2) of the ranks' checksums c
        # (the gradients' sum of squares; equal on every rank iff W sum c^2 == (sum c)^2, up to rounding)
        bad = 1.0 if missing or worst > TOLERANCE else 0.0
        device = self.layers[0].A.device
        flags = torch.tensor([bad, float(checksum), float(checksum) ** 2], dtype=torch.float64, device=device)
        flags = self.distributor.all_reduce_(flags).tolist()
        world = self.distributor.world_size
        spread = world * flags[2] - flags[1] ** 2
        differ = world > 1 and spread > 1e-9 * max(world * flags[2], torch.finfo(torch.float64).tiny)
        if flags[0] == 0 and not differ:
            self.capture.autograd_reuse = "on"
            logger.info("cache-free steps take the products at (A, B) from autograd's LoRA gradients from now on "
                        "(checked equal to the captured products: largest relative difference %.1e)", worst)
            return
        self.capture.autograd_reuse = "off"
        why = (f"{', '.join(missing[:3])} had no fp32 LoRA gradient" if missing else
               "they differ between ranks (not reduced by the engine?)" if differ else
               f"they differ from the captured products by up to {worst:.2g} (relative; allowed {TOLERANCE:g})"
               if bad else "another rank's differ from its captured products")
        logger.warning("autograd's LoRA gradients cannot stand for the cache-free products at (A, B): %s; steps keep "
                       "taking those products (the results are the same; only the hooks' saving is lost)", why)
