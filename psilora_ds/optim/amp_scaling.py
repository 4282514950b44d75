"""``torch.amp.GradScaler`` stepping a PSI-LoRA optimizer (fp16 mixed precision without DeepSpeed).

A scaler multiplies the loss by its scale ``S`` before the backward pass, so every gradient the backward produces is
``S`` times the true one: ``p.grad``, and also the activation gradients ``Z`` the capture hooks keep, which the scaler's
``unscale_`` (it divides the ``p.grad`` of the optimizer's param groups) never reaches. A LoRA optimizer would then step
on ``S P`` — with clipping on, always clipped to ``max_grad_norm``; without it, ``S`` (65536 at first) times too
far — and nothing would say so. So the optimizer declares torch's protocol for optimizers that unscale themselves
(``_step_supports_amp_scaling``): ``scaler.step(opt)`` then hands it ``S`` and whether some gradient overflowed
(``grad_scale``, ``found_inf``, set on the optimizer for the call) and lets it do both: the step skips an overflowed
step (what the scaler would have done; ``scaler.update()`` then lowers ``S``) and otherwise divides ``p.grad`` and the
captured gradient by ``S``. A ``scaler.unscale_(opt)`` before the step (for ``clip_grad_norm_``) cannot be followed
(the captured ``Z`` stays scaled by an ``S`` the optimizer is no longer given): one error says to clip through
``max_grad_norm`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


class UnscaledBeforeStepError(RuntimeError):
    """``GradScaler.unscale_`` ran on a PSI-LoRA optimizer before its step."""


@dataclass(frozen=True)
class AmpScale:
    """The loss scale ``scale`` of the step a GradScaler is taking, and whether some gradient overflowed at it."""

    scale: float
    found_inf: bool


def amp_scale_of(optimizer: torch.optim.Optimizer) -> AmpScale | None:
    """What a ``torch.amp.GradScaler`` stepping ``optimizer`` set on it for this call (None: no scaler steps it)."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return None
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is None:  # the scaler's unscale_ ran: p.grad divided, the captured activation gradients not
        raise UnscaledBeforeStepError(
            "GradScaler.unscale_() was called on this PSI-LoRA optimizer before scaler.step(): it divides p.grad but "
            "not the activation gradients the optimizer captured, which stay scaled; clip through the optimizer's "
            "max_grad_norm instead of unscale_() + clip_grad_norm_(), and let scaler.step() unscale")
    return AmpScale(float(grad_scale), bool(float(found_inf) > 0))


def unscale_grads_(params: Iterable[torch.Tensor], scale: float) -> None:
    """Divide every ``p.grad`` of ``params`` by ``scale`` in place (as the scaler's ``unscale_`` would: by the
    reciprocal taken in double precision)."""
    inv = 1.0 / scale
    for p in params:
        if p.grad is not None:
            p.grad.mul_(inv)


def begin_amp_step(optimizer) -> bool:
    """At the first call of a step of ``optimizer`` (a :class:`~psilora_ds.optim.base.LoRAOptimizer`): follow a
    GradScaler stepping it, if one does. False: the step overflowed at the scaler's scale and is skipped (what was
    captured for it dropped); True: take the step, with ``p.grad`` unscaled here and the captured gradient by the step
    planner's ``loss_scale``."""
    amp = amp_scale_of(optimizer)
    optimizer.planner.loss_scale = 1.0 if amp is None else amp.scale
    if amp is None:
        return True
    if amp.found_inf:
        dropped = optimizer.discard_step()
        logger.info("GradScaler found non-finite gradients at loss scale %g: step skipped (%d captured bytes dropped; "
                    "scaler.update() lowers the scale)", amp.scale, dropped)
        return False
    unscale_grads_((p for group in optimizer.param_groups for p in group["params"]), amp.scale)
    return True
