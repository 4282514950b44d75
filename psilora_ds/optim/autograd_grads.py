"""Autograd's LoRA gradients in place of a step's products at its own factors (METHOD.md section 6).

The backward pass computes ``A.grad = B^T P`` and ``B.grad = P A^T`` whatever the optimizer does, and a data-parallel
engine reduces them over ranks. Where they are whole and reduced (one process, DDP), a step need not compute (and sum
over ranks) those products again: LoRSum's first A-step and its Jacobi B-step take them (``known_products``), and
cache-free capture hooks take only the momentum factors' products (``r`` fewer columns on each side per token and
layer). Factors with a core between them (PoLAR's ``B S A``: ``A.grad = S^T B^T P``, ``S.grad = B^T P A^T``,
``B.grad = P A^T S^T``) are the gradients the method steps on (``factor_gradients``): its hooks then take no products.
Where the engine does not leave them whole at the step (DeepSpeed ZeRO partitions and frees ``p.grad``), a cache-free
capture takes each micro-batch's from hooks on the factors as the backward pass computes them and sums them, over
micro-batches and then ranks, with its products (:meth:`~psilora_ds.products.ProductCapture.take_factor_grads`).

That the engine's gradients are what they must be (this rank's share averaged over the ranks as the distributor's
``grad_coef`` says, identical on every rank) is checked once, on the first step, against the products computed as
before (from the rows, or taken by the hooks): any difference beyond rounding (``TOLERANCE``: bf16 autocast's matrix
products included) and the steps keep computing them, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..distributed import Distributor
from ..gradient import LayerGradient
from ..lora_layers import LoRALayer
from ..ops import factor_gradients
from ..ops.rounds import Rounds, run_lockstep
from ..products import LayerProducts

logger = logging.getLogger(__name__)

# Relative Frobenius difference allowed between autograd's LoRA gradients and the computed products: fp32 products
# differ by summation order (~1e-6); under bf16 autocast the backward's own matrix products round to 8 bits (~4e-3).
TOLERANCE = 2e-2

OFF, VERIFY, ON = "off", "verify", "on"


def plain_grads(factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
    """The gradients of a layer's ``factors`` when they are plain fp32/fp64 tensors of one dtype (not DTensor shards,
    not half precision), else None."""
    grads = tuple(f.grad for f in factors)
    dtype = grads[0].dtype if type(grads[0]) is torch.Tensor else None
    if dtype in (torch.float32, torch.float64) and all(type(g) is torch.Tensor and g.dtype == dtype for g in grads):
        return grads
    return None


def _factor_products(grad: LayerGradient, A: torch.Tensor, B: torch.Tensor) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
    """``(B^T P, P A^T)`` of a gradient on rows, summed over ranks (two rounds)."""
    BtP = yield from grad.left_product(B)
    PAt = yield from grad.right_product(A.T)
    return BtP, PAt


class AutogradGradients:
    """Whether a step takes autograd's LoRA gradients for its products at ``(A, B)``: :attr:`state` is ``"verify"``
    where the distributor's engine leaves whole reduced gradients, or a cache-free capture can sum them itself
    (:attr:`from_capture`), and the factors are fp32/fp64, else ``"off"``;
    the first step checks them (``"on"`` from then on, or ``"off"`` with one warning). A cache-free ``capture`` is told
    (its ``autograd_reuse``), since its hooks decide per step whether to take those products.

    Each step's planning calls :meth:`take` first: it keeps the step's gradients and clears them on the model, so that
    the next step's start from zero as its captured rows or products do."""

    def __init__(self, layers: Sequence[LoRALayer], distributor: Distributor, capture: Any = None, *,
                 enabled: bool, factors: Sequence[tuple[torch.Tensor, ...]]):
        self.layers = layers
        self.distributor = distributor
        self.capture = capture  # a ProductCapture (cache-free), or None: rows
        # each layer's trainable factors in the method's order: (A, B), or (A, S, B)
        self.factors = [tuple(f) for f in factors]
        # (LoRA factors kept in half precision have half-precision gradients: their products stay computed, in fp32)
        full = all(f.dtype in (torch.float32, torch.float64) for fs in self.factors for f in fs)
        # where the engine does not leave them whole at the step (ZeRO), a cache-free capture sums each micro-batch's
        # as the backward pass computes them (hooks on the factors), over ranks with its products
        self.from_capture = (capture is not None and not distributor.lora_grads_are_whole()
                             and distributor.factor_grads_are_whole_locally())
        usable = distributor.lora_grads_are_whole() or self.from_capture
        self._set(VERIFY if enabled and full and usable else OFF)
        if self.from_capture and self.state == VERIFY:
            capture.take_factor_grads(self.factors)
        self._taken: dict[int, tuple[torch.Tensor, ...]] = {}

    def _set(self, state: str) -> None:
        self.state = state
        if self.capture is not None:
            self.capture.autograd_reuse = state

    @property
    def reusing(self) -> bool:
        """Whether the step being planned takes autograd's gradients (cache-free: whether its hooks left out the
        products at ``(A, B)``, decided at its first micro-batch)."""
        return self.capture.reusing_autograd() if self.capture is not None else self.state == ON

    def take(self) -> None:
        """Keep this step's gradients of every layer's factors (``(A.grad, B.grad)``) and clear them on the model (the
        capture was emptied for this step whatever becomes of it: applied, skipped or undone)."""
        self._taken = {}
        if self.state == OFF or self.from_capture:  # (from_capture: the capture holds them; p.grad is the engine's)
            return
        for idx, factors in enumerate(self.factors):
            grads = plain_grads(factors)
            if grads is not None:
                self._taken[idx] = grads
            for f in factors:
                f.grad = None

    def local(self, idxs: Iterable[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The taken gradients of the layers ``idxs`` that have them (for the step's finiteness check)."""
        return {idx: self._taken[idx] for idx in idxs if idx in self._taken}

    def pairs(self, idxs: Iterable[int], products: dict[int, LayerProducts] | None = None,
              coef: float = 1.0) -> dict[int, tuple[torch.Tensor, ...]]:
        """The factors' gradients (``(A.grad, B.grad)``) of every layer in ``idxs``, on a step that takes them: the
        engine's, or (:attr:`from_capture`) those the capture summed with ``products`` (summed over ranks), times the
        engine's share ``coef``."""
        if self.from_capture:
            return {idx: self._scaled(products[idx], coef) for idx in idxs}
        for idx in idxs:
            if idx not in self._taken:
                raise RuntimeError(
                    f"{self.layers[idx].name}: this step takes autograd's LoRA gradients for its products at (A, B) "
                    "(cache-free: its hooks did not take them), but A.grad/B.grad are missing or not fp32 (zeroed or "
                    "cast between backward and step?); build the optimizer with reuse_autograd_grads=False")
        return {idx: self._taken[idx] for idx in idxs}

    def verify_products(self, products: dict[int, LayerProducts], coef: float) -> None:
        """Cache-free, on the step whose hooks took the products at ``(A, B)`` apart (``check_left``,
        ``check_right``; summed over ranks, ``coef`` the engine's share): check autograd's gradients against them."""
        if self.capture is None or not self.capture.checking_autograd() or not products:
            return
        if self.from_capture:
            self._taken = {idx: self._scaled(p, coef) for idx, p in products.items() if p.factor_grads is not None}
        self._decide({idx: self._expected(idx, p.check_left * coef, p.check_right * coef)
                      for idx, p in products.items()})

    def _scaled(self, products: LayerProducts, coef: float) -> tuple[torch.Tensor, ...]:
        """The factors' gradients summed with ``products``, in the engine's scale (``coef``)."""
        if products.factor_grads is None:
            raise RuntimeError("this step takes autograd's LoRA gradients for its products at (A, B), but the capture "
                               "holds none (cache-free: its hooks did not take them); build the optimizer with "
                               "reuse_autograd_grads=False")
        return tuple(g * coef for g in products.factor_grads)

    def verify_rows(self, grads: dict[int, LayerGradient]) -> None:
        """On rows, on the first step (before clipping): ``(B^T P, P A^T)`` of every layer from its rows, summed over
        ranks in two collectives, against autograd's gradients (the factors are the model's own here: the engine
        leaves them whole)."""
        if self.capture is not None or self.state != VERIFY or not grads:
            return
        programs = {idx: _factor_products(g, self.layers[idx].A.detach(), self.layers[idx].B.detach())
                    for idx, g in grads.items()}
        computed = run_lockstep(programs, self.distributor.reduce)
        self._decide({idx: self._expected(idx, *pair) for idx, pair in computed.items()})

    def _expected(self, idx: int, BtP: torch.Tensor, PAt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What autograd's gradients of layer ``idx``'s factors must be, from the products at ``(A, B)``: at the model's
        own factors where the engine leaves them whole, else at those the capture took the products at (a ZeRO-3
        parameter is an empty placeholder between its uses)."""
        held = self.capture.probes.step_factors(idx) if self.from_capture else self.factors[idx]
        factors = tuple(f.detach().to(BtP.dtype) for f in held)
        return factor_gradients(factors, BtP, PAt)

    def _decide(self, computed: dict[int, tuple[torch.Tensor, ...]]) -> None:
        """``"on"`` when autograd's gradients equal ``computed`` (each layer's factor gradients in the engine's scale)
        on every layer and are the same on every rank; else ``"off"``, with one warning."""
        worst, missing = 0.0, []
        checksum = torch.zeros((), dtype=torch.float64)
        for idx, wanted in computed.items():
            pair = self._taken.get(idx)
            if pair is None:
                missing.append(self.layers[idx].name)
                continue
            for grad, want in zip(pair, wanted, strict=True):
                want = want.double()
                diff = (grad.double() - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny)
                worst = max(worst, float(diff))
                checksum += grad.double().square().sum().cpu()
        # one sum over ranks: how many ranks miss a gradient or differ, and (sum c, sum c^2) of the ranks' checksums c
        # (the gradients' sum of squares; equal on every rank iff W sum c^2 == (sum c)^2, up to rounding)
        bad = 1.0 if missing or worst > TOLERANCE else 0.0
        flags = torch.tensor([bad, float(checksum), float(checksum) ** 2], dtype=torch.float64,
                             device=self.layers[0].A.device)
        flags = self.distributor.all_reduce_(flags).tolist()
        world = self.distributor.world_size
        spread = world * flags[2] - flags[1] ** 2
        differ = world > 1 and spread > 1e-9 * max(world * flags[2], torch.finfo(torch.float64).tiny)
        if flags[0] == 0 and not differ:
            self._set(ON)
            logger.info("steps take their products at (A, B) from autograd's LoRA gradients from now on (checked "
                        "equal to the computed products: largest relative difference %.1e)", worst)
            return
        self._set(OFF)
        why = (f"{', '.join(missing[:3])} had no fp32 LoRA gradient" if missing else
               "they differ between ranks (not reduced by the engine?)" if differ else
               f"they differ from the computed products by up to {worst:.2g} (relative; allowed {TOLERANCE:g})"
               if bad else "another rank's differ from its computed products")
        logger.warning("autograd's LoRA gradients cannot stand for the products at (A, B): %s; steps keep computing "
                       "those products (the results are the same; only the saving is lost)", why)
