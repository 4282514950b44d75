"""PSI-LoRA (SGD with low-rank heavy-ball momentum, METHOD.md section 3) and preconditioned LoRA
(its Jacobi, momentum-free special case, METHOD.md section 2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..gradient import LayerGradient, ProductGradient
from ..lora_layers import LoRALayer
from ..ops import compute_dtype
from ..ops.balance import Balance
from ..ops.lorsum import lorsum_rounds
from ..ops.sketch_svd import spectral_step_from_sketch
from ..ops.rounds import Rounds
from .hyperparameters import HYPERPARAMETERS, check
from .lorsum_family import MIN_PROX_WEIGHT, LoRSumOptimizer

MOMENTUM_SEED = 0x5151
# the momentum update's proximal weight relative to the momentum's mean singular value (METHOD.md section 3)
MOMENTUM_PROX = HYPERPARAMETERS["momentum_prox"].default  # (advice: hyperparameters.MOMENTUM_PROX_ADVICE)


def init_low_rank_momentum(layer: LoRALayer, rank_multiplier: float) -> dict[str, torch.Tensor]:
    """Rank-``r_m`` momentum ``M = M_B M_A``: ``M_A`` Gaussian with unit-norm-ish rows, ``M_B`` zero;
    ``r_m = round(r * rank_multiplier)``, at most ``min(m, n)`` (a full-rank momentum: a higher rank would add
    nothing, and its factors could not be balanced).

    Seeded from the layer index so that every data-parallel rank starts from the same ``M_A``.
    """
    m, n = layer.out_features, layer.in_features
    r_m = min(max(1, round(layer.rank * rank_multiplier)), m, n)
    dtype = compute_dtype(layer.lora_A.weight.dtype)
    gen = torch.Generator().manual_seed(MOMENTUM_SEED + layer.index)
    M_A = torch.randn(r_m, n, generator=gen, dtype=dtype) / n**0.5
    device = layer.A.device
    return {"momentum_A": M_A.to(device), "momentum_B": torch.zeros(m, r_m, dtype=dtype, device=device)}


def momentum_prox_weight(state: dict[str, Any], lam: float, momentum_prox: float) -> float | torch.Tensor:
    """The momentum update's proximal weight: ``max(lam, momentum_prox * mean singular value of M)`` (METHOD.md
    section 3, momentum inertia), computed on the device (no host read): shaped ``(1, 1)``, or ``(L, 1, 1)`` for a
    stack of ``L`` layers' momenta. The factors are kept balanced, ``M_B = U S^1/2``, ``M_A = S^1/2 V^T``, so
    ``sum_i |M_A row i| |M_B column i| = sum S``; it is 0 at the start (``M_B = 0``)."""
    if momentum_prox <= 0:
        return lam
    M_A, M_B = state["momentum_A"], state["momentum_B"]
    cd = compute_dtype(M_A.dtype)
    mean_sv = (M_A.to(cd).norm(dim=-1) * M_B.to(cd).norm(dim=-2)).sum(-1) / M_A.shape[-2]
    return torch.clamp(mean_sv * momentum_prox, min=lam)[..., None, None]


def low_rank_momentum_update(
    state: dict[str, Any], grad: LayerGradient | ProductGradient, *, beta: float, grad_scale: float, lam: float,
    iters: int, momentum_prox: float = 0.0,
) -> Rounds[None]:
    """``M <- LoRSum(beta M + grad_scale P)`` warm-started at the old factors, with the proximal weight of
    :func:`momentum_prox_weight`, then re-factored in balanced form (:func:`~psilora_ds.ops.balance_factors`:
    the same product)."""
    lam = momentum_prox_weight(state, lam, momentum_prox)
    M_A, M_B = yield from lorsum_rounds(
        state["momentum_A"], state["momentum_B"], grad.terms(grad_scale), c0=beta, lam=lam, iters=iters,
        reduce=grad.reduce, known_products=grad.known_momentum_products(grad_scale),
    )
    # Only the product M_B M_A is the momentum; left alone, the factors drift apart in scale (on the
    # paper authors' stochastic linear task |M_A| ~ 3e-3 and |M_B| ~ 2e4), the proximal weight lam then
    # dominates one half-step, and the loss rises late in training (METHOD.md section 3, gauge).
    M_A, M_B = yield Balance(M_A, M_B)  # (balanced with every layer's of the round: ops.balance_factors_batch)
    state["momentum_A"], state["momentum_B"] = M_A, M_B


def factor_and_momentum_step(
    state: dict[str, Any], A: torch.Tensor, B: torch.Tensor, grad: LayerGradient | ProductGradient, *, eta: float,
    beta: float, grad_scale: float, lam: float, iters: int, spectral_iters: int | None = None,
    d_out: torch.Tensor | None = None, d_in: torch.Tensor | None = None, momentum_prox: float = 0.0,
) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
    """The factors' step ``(A, B) <- LoRSum(B A - eta (grad_scale P + beta M))`` (F-LoRSum with ``d_out``,
    ``d_in``), then the momentum's ``M <- LoRSum(beta M + grad_scale P)``; returns the new factors.
    ``spectral_iters``: the spectral first step (METHOD.md section 5): that many iterations at the proximal
    floor, then balanced factors; a cache-free gradient carries its sketch instead, reconstructed to rank r."""
    shared = [(-eta * beta, state["momentum_B"], state["momentum_A"])] if beta > 0 else []
    spectral = spectral_iters is not None
    sketch = grad.spectral_sketch(-eta * grad_scale) if spectral else None
    if sketch is not None:
        A_new, B_new = spectral_step_from_sketch(A, B, sketch, terms=shared, d_out=d_out, d_in=d_in)
    else:
        A_new, B_new = yield from lorsum_rounds(A, B, grad.terms(-eta * grad_scale), shared_terms=shared,
                                                lam=MIN_PROX_WEIGHT if spectral else lam,
                                                iters=spectral_iters if spectral else iters,
                                                known_products=grad.known_products(-eta * grad_scale),
                                                d_out=d_out, d_in=d_in, reduce=grad.reduce)
        if spectral:
            A_new, B_new = yield Balance(A_new, B_new)
    if beta > 0:
        yield from low_rank_momentum_update(state, grad, beta=beta, grad_scale=grad_scale, lam=lam, iters=iters,
                                            momentum_prox=momentum_prox)
    return A_new, B_new


def jacobi_blocker(iters: int) -> str | None:
    """Why LoRSum with ``iters`` inner iterations needs the activation rows (None: it does not)."""
    if iters == 0:
        return None
    return (f"iters={iters} alternates between factors found during the step, whose products with the gradient "
            "only the cached rows give (cache-free steps are Jacobi steps, iters=0)")


class PSILoRA(LoRSumOptimizer):
    """Proximal Subspace Iteration LoRA.

    Each step approximates the SVDLoRA oracle ``(A, B) <- svd_r(B A - eta' d)`` with
    ``d = beta M + (1 - dampening) P`` and ``eta' = lr / scaling**2``, by LoRSum on thin
    matrices. ``lr`` is the step size of the effective weight ``W0 + scaling * B A``.

    Args:
        model: a peft model with LoRA adapters (hooks are registered on it).
        lr: step size in effective-weight space.
        momentum: heavy-ball ``beta``; 0 keeps no momentum state.
        dampening: as in ``torch.optim.SGD``.
        iters: LoRSum inner iterations (0 = Jacobi = preconditioned LoRA).
        prox: proximal weight relative to lr (``lam = lr * prox``).
        rank_multiplier: momentum rank ``round(r * rank_multiplier)``.
        momentum_prox: the momentum update's proximal weight relative to the momentum's mean singular value
            (``lam_M = max(lam, momentum_prox * mean sv(M))``): its subspace's inertia against the noise of one
            mini-batch (METHOD.md section 3); 0 gives the plain ``lam``.
        first_step_iters: the spectral first step (LoRA-One, arXiv 2502.01235): the run's first step takes this
            many inner iterations with a negligible proximal weight, then balances the factors, reaching the
            SVDLoRA oracle's step (from peft's ``B = 0``: the truncated SVD of the first full gradient step).
            Cache-free optimizers take a two-sided sketch of that step's gradient instead of rows
            (:mod:`~psilora_ds.ops.sketch_svd`). None: an ordinary first step.
        **options: the family's shared options (:class:`~psilora_ds.optim.options.LoRAOptions`: clipping,
            the other trainables' optimizer, the engine's distributor, the activation cache).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        iters: int = 1,
        prox: float = 1e-2,
        rank_multiplier: float = 1.0,
        momentum_prox: float = MOMENTUM_PROX,
        first_step_iters: int | None = None,
        **options: Any,
    ):
        check(first_step_iters=first_step_iters, momentum_prox=momentum_prox, momentum=momentum, iters=iters,
              prox=prox, rank_multiplier=rank_multiplier)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, iters=iters, prox=prox,
                        rank_multiplier=rank_multiplier, momentum_prox=momentum_prox, first_step_iters=first_step_iters)
        super().__init__(model, defaults, **options)

    def init_state(self, layer, group) -> dict[str, Any]:
        return init_low_rank_momentum(layer, group["rank_multiplier"]) if group["momentum"] > 0 else {}

    def cache_free_blocker(self, group) -> str | None:
        return jacobi_blocker(group["iters"])

    def momentum_keys(self, group):
        return ("momentum_A", "momentum_B") if group["momentum"] > 0 else None

    def steps_stacked(self, group) -> bool:
        return True  # (a first step from the sketch reads the layer's own: its gradient is never stacked)

    def update_layer(self, layer, state, factors, grad, group):
        A, B = factors
        return (yield from factor_and_momentum_step(
            state, A, B, grad, eta=group["lr"] / layer.scaling**2,  # product-space step (METHOD.md section 1)
            beta=group["momentum"], grad_scale=1.0 - group["dampening"], lam=self.prox_weight(group),
            iters=group["iters"], spectral_iters=self.spectral_iters(group), momentum_prox=group["momentum_prox"]))


class PreconditionedLoRA(PSILoRA):
    """Preconditioned (scaled-GD / Riemannian) LoRA: ``PSILoRA(iters=0, momentum=0)``.

    ``A <- A - eta' (B^T B + lam I)^-1 B^T P``, ``B <- B - eta' P A^T (A A^T + lam I)^-1``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        *,
        prox: float = 1e-2,
        first_step_iters: int | None = None,
        **options: Any,
    ):
        super().__init__(model, lr, momentum=0.0, iters=0, prox=prox, first_step_iters=first_step_iters, **options)
