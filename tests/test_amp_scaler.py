"""``torch.amp.GradScaler`` stepping a PSI-LoRA optimizer (optim/amp_scaling.py): the optimizer unscales p.grad and its
captured activation gradients itself, so a scaled run equals the unscaled one (rows, cache-free, PoLAR); an overflowed
step is skipped with its capture dropped; ``unscale_`` before the step is refused in one line."""

import pytest
import torch
import torch.nn.functional as F

from psilora_ds import PreconditionedLoRA, ScaledPSILoRA
from psilora_ds.optim import PoLAR
from psilora_ds.optim.amp_scaling import UnscaledBeforeStepError

from .distributed import regression_batches, rel_err
from .models import lora_two_layer_net, polar_two_layer_net

STEPS, B = 4, 8
SCALE = 2.0**14  # far above 1: an unscaled capture would step that many times too far


def make(name, clip):
    if name == "polar":
        model = polar_two_layer_net()
        return model, PoLAR(model, 1e-2, max_grad_norm=clip)
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    if name == "precond-cache-free":
        return model, PreconditionedLoRA(model, 0.1, max_grad_norm=clip)
    if name == "scaled-cache-free":
        return model, ScaledPSILoRA(model, 1e-3, iters=0, max_grad_norm=clip)
    return model, ScaledPSILoRA(model, 1e-3, iters=1, max_grad_norm=clip)  # rows (the default iters)


def run(name, *, scaler=None, clip=None, overflow_at=None, skip=None):
    """``STEPS`` steps, with ``scaler`` (a GradScaler) or plain; ``overflow_at``: a step whose head gradient is made
    inf before the scaler's step; ``skip``: a batch left out entirely (the plain run's match for an overflow)."""
    model, opt = make(name, clip)
    for i, (x, t) in enumerate(regression_batches(23, STEPS, B)):
        if i == skip:
            continue
        loss = F.mse_loss(model(x), t)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if i == overflow_at:
                head = next(p for p in opt.other_optimizer.param_groups[0]["params"] if p.grad is not None)
                head.grad[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return opt, [tuple(f.detach().clone() for f in opt.layer_factors(layer)) for layer in opt.layers]


NAMES = ["scaled-rows", "scaled-cache-free", "precond-cache-free", "polar"]


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clipping", "clipping"])
@pytest.mark.parametrize("name", NAMES)
def test_a_scaled_run_equals_the_unscaled_one(name, clip):
    plain, want = run(name, clip=clip)
    scaled, got = run(name, clip=clip, scaler=torch.amp.GradScaler("cpu", init_scale=SCALE))
    for a, b in zip(got, want):
        for f, g in zip(a, b):
            assert rel_err(f, g) <= 1e-5, name
    assert scaled.steps_taken == plain.steps_taken == STEPS
    if clip:
        assert scaled.last_grad_norm == pytest.approx(plain.last_grad_norm, rel=1e-5) and plain.last_grad_norm > clip
    # the reuse check sees autograd's gradients unscaled, like the products
    assert scaled.planner.autograd.state == plain.planner.autograd.state == "on"


@pytest.mark.parametrize("name", ["scaled-rows", "scaled-cache-free"])
def test_an_overflowed_step_is_skipped_and_its_capture_dropped(name):
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaled, got = run(name, scaler=scaler, overflow_at=1)
    assert scaler.get_scale() == SCALE / 2 and scaled.steps_taken == STEPS - 1
    _, want = run(name, skip=1)
    for a, b in zip(got, want):
        for f, g in zip(a, b):
            assert rel_err(f, g) <= 1e-5, name


def test_unscale_before_the_step_is_refused():
    model, opt = make("scaled-rows", 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, t = next(iter(regression_batches(23, 1, B)))
    scaler.scale(F.mse_loss(model(x), t)).backward()
    scaler.unscale_(opt)
    with pytest.raises(UnscaledBeforeStepError, match="clip through the optimizer's max_grad_norm"):
        scaler.step(opt)
