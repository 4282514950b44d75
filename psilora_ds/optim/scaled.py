"""Scaled PSI-LoRA: F-LoRSum steps under diagonal fractional K-FAC or Shampoo metrics, with an
EMA low-rank momentum (METHOD.md section 4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..gradient import LayerGradient
from ..ops import (adafactor_normalized, compute_dtype, damped_power, factored_second_moments, kfac_diagonals,
                   shampoo_diagonals)
from ..ops.sketch_svd import gradient_sketch_seed, sketch_probes
from ..ops.rounds import Rounds
from ..products import HookStatistics
from .hyperparameters import HYPERPARAMETERS, ByMetric, check
from .lorsum_family import LoRSumOptimizer
from .psilora import (MOMENTUM_PROX, factor_and_momentum_step,
                      init_low_rank_momentum, jacobi_blocker)

METRIC_INITS = HYPERPARAMETERS["metric_init"].choices
# the default metric power: 1 under K-FAC (the quality map: below or level with the paper's 1/2 in every cell, each at
# its best lr, docs/BENCHMARKS.md); 1/2 under Shampoo (not measured) and Adafactor (1/2 makes it Adafactor's step)
METRIC_POWER = ByMetric((("kfac", 1.0), ("shampoo", 0.5), ("adafactor", 0.5)))


class ScaledPSILoRA(LoRSumOptimizer):
    """Scaled PSI-LoRA.

    Per step and layer: EMA metric statistics (from zero and bias-corrected like Adam's second moment; or from
    ones, uncorrected: ``metric_init="ones"``, the paper authors' code),
    ``D = (stat + damping) ** metric_power``, then
    ``(A, B) <- F-LoRSum(T~ = B A - eta' D_out^-1 ((1 - beta1) P + beta1 M) D_in^-1)`` and
    ``M <- LoRSum(beta1 M + (1 - beta1) P)``, with ``eta' = lr / scaling**2``.

    Args:
        model: a peft model with LoRA adapters.
        lr: step size in effective-weight space.
        betas: ``(beta1, beta2)``: momentum EMA and metric EMA.
        iters: LoRSum inner iterations.
        prox: ``lam = lr * prox``.
        damping: ``delta`` added to the metric statistics before the power.
        metric_power: ``p`` in [0, 1] (1/2 = square-root K-FAC, the paper's default). None (the default): 1 under
            ``metric="kfac"``, lower or level with 1/2 in every cell of the quality map, each at its own best lr, whose
            unit is then a thirtieth to a hundredth of 1/2's (0.1-0.32x LoRA-AdamW's, not 10-22x;
            docs/BENCHMARKS.md); 1/2 under ``"shampoo"`` and ``"adafactor"`` (:data:`METRIC_POWER`).
        metric: ``"kfac"`` (diag E[x x^T], diag E[g g^T]), ``"shampoo"`` (diag G^T G, diag G G^T) or
            ``"adafactor"``: EMAs of the row and column sums of ``G**2`` (``G`` the full gradient of the step, not
            per-example), from the two-sided sketch ``(G Omega, Psi G)``, each normalized by the root of its sum, so
            that ``D_out D_in^T`` is ``V**metric_power`` for Adafactor's factored second moment ``V = R C^T / sum R``
            (METHOD.md section 4); with ``metric_power=0.5`` the step projects an Adafactor step.
        rank_multiplier: momentum rank ``round(r * rank_multiplier)`` (``1/r`` gives rank 1); 2 by default: a rank-2r
            momentum ended below rank r in every cell of the quality map, at the same lr (docs/BENCHMARKS.md).
        momentum_prox: the momentum update's proximal weight relative to the momentum's mean singular value
            (:class:`~psilora_ds.optim.psilora.PSILoRA`; METHOD.md section 3); 0 gives the plain ``lam``.
        first_step_iters: the spectral first step (LoRA-One, arXiv 2502.01235): the run's first step takes this
            many inner iterations with a negligible proximal weight, then balances the factors, reaching the
            SVDLoRA oracle's step (from peft's ``B = 0``: the truncated SVD of the first full gradient step).
            Cache-free optimizers take a two-sided sketch of that step's gradient instead of rows
            (:mod:`~psilora_ds.ops.sketch_svd`). None: an ordinary first step.
        metric_init: ``"zero"``: the EMAs start at zero and are bias-corrected (``stat / (1 - beta2^t)``);
            ``"ones"``: they start at ones, uncorrected, as in the paper authors' code (an implicit warm-up:
            the first steps are preconditioned by about the identity; :mod:`psilora_ds.presets`).
        **options: the family's shared options (:class:`~psilora_ds.optim.options.LoRAOptions`).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        iters: int = 1,
        prox: float = 1e-2,
        damping: float = 1e-8,
        metric_power: float | None = None,
        metric: str = "kfac",
        rank_multiplier: float = 2.0,
        metric_init: str = "zero",
        momentum_prox: float = MOMENTUM_PROX,
        first_step_iters: int | None = None,
        **options: Any,
    ):
        if metric_power is None:  # (None for an unknown metric: check reports the metric first)
            metric_power = METRIC_POWER.resolve(metric)
        check(first_step_iters=first_step_iters, momentum_prox=momentum_prox, metric_init=metric_init, metric=metric,
              betas=betas, metric_power=metric_power, damping=damping, iters=iters, prox=prox,
              rank_multiplier=rank_multiplier)
        if damping <= 0 and metric_power > 0:
            raise ValueError(f"damping must be > 0 so the metric is invertible, got {damping}")
        defaults = dict(lr=lr, betas=tuple(betas), iters=iters, prox=prox, damping=damping,
                        metric_power=metric_power, metric=metric, rank_multiplier=rank_multiplier, metric_init=metric_init,
                        momentum_prox=momentum_prox, first_step_iters=first_step_iters)
        super().__init__(model, defaults, **options)

    def check_distributor(self, distributor) -> None:
        if self.lora_group["metric"] == "shampoo" and distributor.world_size > 1:
            raise ValueError(
                "metric='shampoo' needs the column norms of the rank-summed gradient, which data parallelism "
                "cannot reduce from thin products; use metric='kfac' with several ranks"
            )

    def hook_statistics(self, group) -> HookStatistics:
        spectral = super().hook_statistics(group)
        return HookStatistics(gradient_sketch=group["metric"] == "adafactor" or spectral.gradient_sketch,
                              kfac_sums=group["metric"] == "kfac")

    def cache_free_blocker(self, group) -> str | None:
        if group["metric"] == "shampoo":
            return "metric='shampoo' needs the column norms of the whole gradient, which only the rows give"
        return jacobi_blocker(group["iters"])

    def steps_stacked(self, group) -> bool:
        return group["metric"] == "kfac"  # (the Adafactor metric's probes are seeded by the layer's index)

    def momentum_keys(self, group):
        return ("momentum_A", "momentum_B") if group["betas"][0] > 0 else None

    def init_state(self, layer, group) -> dict[str, Any]:
        dtype = compute_dtype(layer.lora_A.weight.dtype)
        device = layer.A.device
        start = torch.ones if group["metric_init"] == "ones" else torch.zeros
        state = {
            "step": 0,
            "metric_in": start(layer.in_features, dtype=dtype, device=device),
            "metric_out": start(layer.out_features, dtype=dtype, device=device),
        }
        if group["betas"][0] > 0:
            state.update(init_low_rank_momentum(layer, group["rank_multiplier"]))
        return state

    def _metric_statistics(self, group, layer, grad: LayerGradient) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
        """This step's ``(d_in, d_out)`` statistics of the (clipped) gradient, over all ranks."""
        if group["metric"] == "kfac":
            sum_x2, sum_z2 = yield from grad.kfac_sums()
            return kfac_diagonals(sum_x2, sum_z2, grad.rows, layer.scaling)
        if group["metric"] == "adafactor":  # at the probes the cache-free hooks draw for this step (same seed)
            sketch = yield from grad.two_sided_sketch(lambda: sketch_probes(
                layer.out_features, layer.in_features, layer.rank, gradient_sketch_seed(self.steps_taken, layer.index),
                dtype=compute_dtype(layer.lora_A.weight.dtype), device=layer.A.device))
            return factored_second_moments(sketch.Y, sketch.W, layer.scaling)
        if not grad.dense_for_quadratics:
            d_in, d_out = shampoo_diagonals(grad.X, grad.Z, layer.scaling)
        else:
            G2 = grad.local_dense().square_().div_(layer.scaling**2)
            d_in, d_out = G2.sum(0), G2.sum(1)
        return d_in * grad.coef**2, d_out * grad.coef**2

    def update_layer(self, layer, state, factors, grad, group):
        A, B = factors
        beta1, beta2 = group["betas"]
        state["step"] += 1
        d_in, d_out = yield from self._metric_statistics(group, layer, grad)
        state["metric_in"].mul_(beta2).add_(d_in, alpha=1 - beta2)
        state["metric_out"].mul_(beta2).add_(d_out, alpha=1 - beta2)
        # Bias correction, as for Adam's second moment: otherwise the first steps would be
        # (1 - beta2)^(-p) times too large on each side.
        correction = 1.0 if group["metric_init"] == "ones" else 1 - beta2 ** state["step"]
        stat_in, stat_out = state["metric_in"] / correction, state["metric_out"] / correction
        if group["metric"] == "adafactor":  # R_i C_j / sum R, split between the sides (METHOD.md section 4)
            stat_in, stat_out = adafactor_normalized(stat_in), adafactor_normalized(stat_out)
        D_in = damped_power(stat_in, group["damping"], group["metric_power"])
        D_out = damped_power(stat_out, group["damping"], group["metric_power"])

        return (yield from factor_and_momentum_step(
            state, A, B, grad, eta=group["lr"] / layer.scaling**2, beta=beta1, grad_scale=1 - beta1,
            lam=self.prox_weight(group), iters=group["iters"], spectral_iters=self.spectral_iters(group),
            d_out=D_out, d_in=D_in, momentum_prox=group["momentum_prox"]))
