"""The first call of an optimizer step: what was captured, whether every rank takes the step, each layer's
gradient and the clipping coefficient."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..capture import LayerBatch
from ..distributed import Distributor
from ..gradient import LayerGradient, ProductGradient
from ..lora_layers import LoRALayer
from ..ops import compute_dtype
from ..ops.rounds import host_tensor, reduce_flat_, run_lockstep
from ..product_buckets import BucketedReduction, estimated_products_nbytes
from ..products import LayerProducts
from .autograd_grads import ON, AutogradGradients
from .factor_source import FactorSource
from .finite_guard import any_non_finite
from .other_params import local_grads

logger = logging.getLogger(__name__)

# As in torch.nn.utils.clip_grad_norm_.
CLIP_EPS = 1e-6

# why a step is skipped on every rank
NON_FINITE = "non-finite gradient factors"
DIVERGED = "the LoRA factors themselves are not finite"
NORM_OVERFLOW = "the gradient norm overflows"


@dataclass
class StepPlan:
    """What the first call of a step decided, for the calls that follow within the same step.

    ``skip``: why every rank skips the step (None: it is taken); ``grads``: the gradient of each layer that
    captured rows on some rank, already scaled by the clipping coefficient ``clip``; ``grad_norm``: ``||G||_F``
    when it was computed; ``cache_bytes``: the capture's peak during the step (None on a call that found nothing
    captured)."""

    skip: str | None
    clip: float
    grads: dict[int, LayerGradient | ProductGradient]
    grad_norm: float | None = None
    cache_bytes: int | None = None


class StepPlanner:
    """Plans each step from what the capture holds: one all-reduce of flags (which layers captured rows anywhere,
    whether any rank saw a non-finite value, whether the engine's factors changed behind the optimizer's copy), then
    each layer's gradient (:class:`~psilora_ds.gradient.LayerGradient` on rows, or
    :class:`~psilora_ds.gradient.ProductGradient` from cache-free products) and the clipping coefficient of the full
    gradient norm (METHOD.md section 6)."""

    def __init__(self, layers: Sequence[LoRALayer], distributor: Distributor, capture: Any, factors: FactorSource,
                 *, cache_free: bool, reuse_autograd_grads: bool,
                 layer_factors: Sequence[tuple[torch.Tensor, ...]]):
        self.layers = layers
        self.distributor = distributor
        self.capture = capture
        self.factors = factors
        self.cache_free = cache_free
        # Take the LoRSum products at the current factors from autograd's LoRA gradients (A.grad = B^T P,
        # B.grad = P A^T) instead of computing them (METHOD.md section 6), where the engine leaves them whole and
        # reduced, once the first step has checked them (autograd_grads)
        self.autograd = AutogradGradients(layers, distributor, capture if cache_free else None,
                                          enabled=reuse_autograd_grads, factors=layer_factors)
        self.logged_sketch = False
        self.logged_late = False
        # the loss scale of a torch.amp.GradScaler stepping the optimizer this step (amp_scaling): the captured Z are
        # that many times the gradient
        self.loss_scale = 1.0

    @property
    def device(self) -> torch.device:
        return self.layers[0].A.device

    def plan(self, other_groups: list[dict[str, Any]], max_grad_norm: float | None, step: int,
             sketch_probes: int) -> StepPlan:
        """Consume the capture and plan the step (every rank, together: collectives)."""
        peak_cache_bytes = self.capture.peak_nbytes
        batches = self.capture.pop()
        d, L = self.distributor, len(self.layers)
        copy = self.factors.copy
        # cache-free over several ranks: the products' sums started in the backward pass (product_buckets)
        reduction = self.capture.reduction if self.cache_free else None
        # One vector of flags, summed over ranks and read once (on a GPU the step's one host read before the clipping
        # norm): rows per layer, then one non-finite flag, then (with a factor copy) per layer whether the engine's
        # factors changed behind it, then (buckets) whether a micro-batch came late, then (cache-free) per layer
        # whether the factors the products were taken at are stale. What is known on the host goes in by one copy,
        # what is on the device by device copies.
        finite_at = L
        changed_at = L + 1
        late_at = changed_at + (L if copy is not None else 0)
        stale_at = late_at + (1 if reduction is not None else 0)
        # (then, where the capture sums the factors' autograd gradients: whether one failed to come)
        incomplete_at = stale_at + (L if self.cache_free else 0)
        host = [0.0] * (incomplete_at + (1 if self.autograd.from_capture else 0))
        for idx, batch in batches.items():
            host[idx] = float(batch.rows)
        if reduction is not None:
            host[late_at] = 0.0 if reduction.late_layer is None else 1.0
        incomplete: list[int] = []
        if self.autograd.from_capture:  # (cache-free: every batch is a LayerProducts)
            incomplete = [idx for idx, b in batches.items() if not b.factor_grads_complete]
            host[incomplete_at] = float(bool(incomplete))
        flags = host_tensor(host, self.device)
        self.autograd.take()
        taken = self.autograd.local(batches) if self.autograd.reusing else {}
        flags[finite_at] = self.non_finite_flag(batches, taken, other_groups)
        if copy is not None:
            flags[changed_at: changed_at + L] = self.factors.changed_flags()
        stale_here = None
        if self.cache_free:
            stale_here = self.factors.stale_flags()
            flags[stale_at: stale_at + L] = stale_here
        flags = d.all_reduce_(flags).tolist()
        if copy is not None:
            self.factors.reread([idx for idx in range(L) if flags[changed_at + idx] > 0])
        rows = flags[:L]
        summed = None
        if reduction is not None:
            summed = self.finish_reduction(reduction, batches, rows, skip=flags[finite_at] > 0,
                                           late=flags[late_at] > 0)
        if self.autograd.from_capture and flags[incomplete_at] > 0:  # (every rank raises: no collective left in flight)
            where = f" ({self.layers[incomplete[0]].name} here)" if incomplete else ""
            raise RuntimeError(
                f"autograd's gradient of some LoRA factor did not come in this step's backward pass{where}, while its "
                "products at (A, B) were left to those gradients (a factor frozen or replaced after the optimizer was "
                "built?); build the optimizer with reuse_autograd_grads=False")
        if flags[finite_at] > 0:
            return StepPlan(skip=DIVERGED if self.factors.diverged() else NON_FINITE, clip=1.0, grads={})
        # A layer that captured nothing on any rank is left out: it keeps its factors and state,
        # as torch optimizers skip parameters whose grad is None.
        # cache-free: the step starts from the factors the products were taken at, checked against the engine's
        # (stale on any rank stops every rank, before any further collective: a rank raising alone would leave the
        # others in one)
        if stale_here is not None:
            stale = [idx for idx in range(L) if rows[idx] > 0 and flags[stale_at + idx] > 0]
            if stale:
                self.factors.raise_stale(stale, stale_here)
        if summed is not None:
            grads = self.summed_product_gradients(summed, rows)
        elif self.cache_free:
            grads = self.product_gradients(batches, rows)
        else:
            grads = {idx: self.layer_gradient(idx, batches.get(idx), int(n)) for idx, n in enumerate(rows) if n > 0}
            self.autograd.verify_rows(grads)  # (the first step: then "on", or "off")
            if self.autograd.state == ON:
                for idx, pair in self.autograd.pairs(grads).items():
                    grads[idx].autograd = pair
        if self.cache_free and max_grad_norm and not d.sketches_norm() and not self.logged_sketch:
            self.logged_sketch = True
            logger.warning("cache-free steps keep no rows, so the clipping norm is the %d-probe random-sign sketch "
                           "(relative sd <= %.2f), not the exact one-process norm; cache_free=False keeps the rows",
                           sketch_probes, math.sqrt(2 / sketch_probes))
        plan = StepPlan(skip=None, clip=1.0, grads=grads, cache_bytes=peak_cache_bytes if grads else None)
        if not max_grad_norm or max_grad_norm <= 0:
            return plan
        norm = self.grad_norm(grads, other_groups, step)
        if grads:  # (not a ZeRO-3 call after the one that consumed the capture)
            plan.grad_norm = norm
        if not math.isfinite(norm):  # finite factors whose gradient norm overflows: no finite step can come of it
            plan.skip, plan.grads = NORM_OVERFLOW, {}
            return plan
        plan.clip = min(1.0, max_grad_norm / (norm + CLIP_EPS))
        for grad in grads.values():
            grad.coef *= plan.clip
        return plan

    def grad_coef(self) -> float:
        """Multiplier turning this rank's captured ``Z`` into its share of the gradient (the engine's, unscaled)."""
        return self.distributor.grad_coef() / self.loss_scale

    def layer_gradient(self, idx: int, batch: LayerBatch | None, rows: int) -> LayerGradient:
        """Layer ``idx``'s gradient from this rank's captured rows (``rows``: over all ranks)."""
        layer = self.layers[idx]
        if batch is None:  # captured nothing here but elsewhere: take part in the collectives with no rows
            dtype = compute_dtype(layer.lora_A.weight.dtype)
            batch = LayerBatch(xs=[torch.zeros(0, layer.in_features, dtype=dtype, device=layer.A.device)],
                               zs=[torch.zeros(0, layer.out_features, dtype=dtype, device=layer.A.device)])
        return LayerGradient(batch, self.grad_coef(), rows, self.distributor.reduce)

    def finish_reduction(self, reduction: BucketedReduction, batches: dict[int, LayerProducts], rows: list[float], *,
                         skip: bool, late: bool) -> dict[int, LayerProducts] | None:
        """Wait for the products' bucketed sums (every bucket started, on every rank, when some rank has products) and
        return every layer's products summed over ranks; None when the step is skipped, or when some rank took a
        micro-batch after its bucket had started (``late``: the step then sums them itself, logged once)."""
        if reduction.late_layer is not None and not self.logged_late:
            self.logged_late = True
            logger.warning("%s took a micro-batch after its products' all-reduce had started (the step took more "
                           "backward passes than the %s micro-batches expected): such steps sum their products at the "
                           "step instead of during the backward pass; give the optimizer accumulation_steps",
                           self.layers[reduction.late_layer].name, self.capture.microbatches_per_step)
        if not any(n > 0 for n in rows):
            reduction.abandon()
            return None
        return reduction.finish(lambda idx: batches[idx] if idx in batches else self.capture.zeros(idx),
                                keep=not skip and not late)

    def summed_product_gradients(self, summed: dict[int, LayerProducts], rows: list[float]) -> dict[int, ProductGradient]:
        """The cache-free gradients of the layers that captured rows on some rank, from products summed over ranks
        (and autograd's LoRA gradients, on steps that left the products at ``(A, B)`` to them)."""
        coef = self.grad_coef()
        present = {idx: int(n) for idx, n in enumerate(rows) if n > 0}
        self.autograd.verify_products({idx: summed[idx] for idx in present}, coef)  # (the first step)
        pairs = {}
        if self.autograd.reusing and self.autograd.state == ON:
            pairs = self.autograd.pairs(present, summed, coef)
        elif self.autograd.reusing:  # the check failed: the products at (A, B) taken apart stand in for them
            summed = {idx: summed[idx].with_factor_products() for idx in present}
        return {idx: ProductGradient(summed[idx], self.layers[idx].rank, coef, n, self.capture.probes.pair(idx),
                                     self.capture.sketch_of(idx, summed[idx]), pairs.get(idx))
                for idx, n in present.items()}

    def product_gradients(self, batches: dict[int, LayerProducts], rows: list[float]) -> dict[int, ProductGradient]:
        """The cache-free gradients of the layers that captured rows on some rank: every rank's products
        summed by one flat all-reduce for all layers (a rank that saw none of a layer adds zeros)."""
        present = [idx for idx, n in enumerate(rows) if n > 0]
        products = {idx: batches.get(idx) or self.capture.zeros(idx) for idx in present}
        tensors = [t for idx in present for t in products[idx].tensors()]
        if self.distributor.reduce is not None and tensors:
            reduce_flat_(tensors, self.distributor.reduce)
        return self.summed_product_gradients(products, rows)

    def non_finite_flag(self, batches: dict[int, LayerBatch | LayerProducts],
                        autograd: dict[int, tuple[torch.Tensor, torch.Tensor]],
                        other_groups: list[dict[str, Any]]) -> torch.Tensor:
        """1 (a 0-d float64 tensor, not read) when some captured factor or other gradient is not finite, else 0
        (:func:`~psilora_ds.optim.finite_guard.any_non_finite`: one sum per tensor, or on CUDA one fused kernel per
        dtype).

        A layer whose autograd products are used is checked on them, and on its rows only when they are cache-free
        products (small): a non-finite entry of ``X`` or ``Z`` makes ``B.grad = s Z^T (X A^T)`` non-finite (IEEE:
        ``inf * 0`` is NaN, so no multiplier hides it), which reads ``r (m + n)`` numbers instead of ``N (m + n)``."""
        tensors = []
        for i, b in batches.items():
            if i in autograd:
                tensors += autograd[i]
            if i not in autograd or isinstance(b, LayerProducts):
                tensors += b.tensors()
        tensors += local_grads(other_groups)
        return any_non_finite(tensors, self.device)

    def grad_norm(self, grads: dict[int, LayerGradient | ProductGradient], other_groups: list[dict[str, Any]],
                  step: int) -> float:
        """``||G||_F`` over every LoRA layer's effective weight (``G = P / scaling``) and the other
        trainable parameters' gradients, over all ranks (METHOD.md section 6): exact in one process,
        the distributor's documented estimator across ranks; ``step`` seeds the sketch."""
        d = self.distributor
        squares = run_lockstep({i: d.lora_norm_sq(self.layers[i], g, step) for i, g in grads.items()},
                               d.reduce)  # every layer's sketch summed over ranks in one collective
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in grads:
            total += squares[i].to(device=self.device, dtype=torch.float64) / self.layers[i].scaling ** 2
        other = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in local_grads(other_groups):
            other += g.to(compute_dtype(g.dtype)).square().sum().to(device=self.device, dtype=torch.float64)
        if d.other_grads_are_sharded():
            other = d.all_reduce_(other)
        return math.sqrt(float(total + other))  # (the one host read of the norm)


def capture_memory_message(capture: Any, layers: Sequence[LoRALayer], cache_free: bool) -> str:
    """What the capture holds per rank at the first step, and what the other mode would (logged once)."""
    mib = 2.0**-20
    if cache_free:
        sketch = (f" (with the two-sided gradient sketches, {capture.sketch_nbytes * mib:.3g} MiB, and their "
                  f"probes, {capture.sketch_probe_nbytes * mib:.3g} MiB)" if capture.sketching() else "")
        return (f"cache-free capture: no activation rows kept; {capture.nbytes * mib:.1f} MiB of thin products{sketch} "
                f"and {capture.probes.nbytes * mib:.1f} MiB of probe factors per rank")
    rows = sum(layer.in_features + layer.out_features for layer in layers) * capture.row_itemsize
    products = sum(estimated_products_nbytes(layer) for layer in layers)
    budget = "none" if capture.max_bytes is None else f"{capture.max_bytes * mib:.1f} MiB"
    where = (f"{capture.folded_layers()} of {len(layers)} layers folded into dense fp32 stores" if not capture.offload
             else f"{capture.peak_host_nbytes * mib:.1f} MiB of rows offloaded to host memory")
    return (f"activation cache: {capture.peak_nbytes * mib:.1f} MiB per rank at its peak in the first step (budget "
            f"{budget}; rows {rows * mib:.2f} MiB per token; {where}); cache-free steps (iters=0) would hold about "
            f"{products * mib:.1f} MiB of products instead")
