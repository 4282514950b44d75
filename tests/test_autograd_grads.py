"""Autograd's LoRA gradients in place of a step's products at (A, B) (METHOD.md section 6), on rows: checked once
against the products from the rows, then used; gradients that are not the captured ones are refused visibly and the
products are computed as before. (The cache-free hooks' side and the engines: tests/test_cache_free.py.)"""

import logging

import torch
import torch.nn.functional as F

from psilora_ds import ScaledPSILoRA

from .distributed import regression_batches, rel_err
from .models import lora_two_layer_net

STEPS, B = 4, 8


def run(*, reuse=True, scale_grads=1.0, iters=1):
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = ScaledPSILoRA(model, 1e-2, iters=iters, max_grad_norm=0.05, cache_free=False, reuse_autograd_grads=reuse)
    for x, t in regression_batches(3, STEPS, B):
        F.mse_loss(model(x), t).backward()
        if scale_grads != 1.0:  # what a user's own clip_grad_norm_ or loss scaler would do to p.grad only
            for layer in opt.layers:
                layer.A.grad.mul_(scale_grads)
                layer.B.grad.mul_(scale_grads)
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for layer in opt.layers for p in (layer.A, layer.B)]


def test_rows_steps_take_autograds_gradients_once_checked(caplog):
    """One process, rows: the first step checks A.grad, B.grad against (B^T P, P A^T) from the rows (logged), the
    later ones take them for LoRSum's first A-step and use no product at (A, B) from the rows; the factors equal a run
    that computes them (2e-6, fp32), and the planning leaves no LoRA gradient behind."""
    with caplog.at_level(logging.INFO, logger="psilora_ds.optim.autograd_grads"):
        opt, reused = run()
    assert opt.planner.autograd.state == "on" and "from now on" in caplog.text
    off, computed = run(reuse=False)
    assert off.planner.autograd.state == "off"
    for a, b in zip(reused, computed, strict=True):
        assert rel_err(a, b) <= 2e-6
    assert all(layer.A.grad is None and layer.B.grad is None for layer in opt.layers)


def test_gradients_changed_before_the_step_are_refused_visibly(caplog):
    """A.grad, B.grad scaled behind the optimizer (a user's own clipping of p.grad): the first step's check finds them
    unequal to the rows' products, warns once, and every step computes those products (the factors equal the run that
    never reused them)."""
    with caplog.at_level(logging.WARNING, logger="psilora_ds.optim.autograd_grads"):
        opt, got = run(scale_grads=0.5)
    assert opt.planner.autograd.state == "off"
    assert caplog.text.count("cannot stand for the products") == 1 and "differ from the computed products" in caplog.text
    _, want = run(reuse=False)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 2e-6
