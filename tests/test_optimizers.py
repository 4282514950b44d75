"""Each optimizer's step equals the dense float64 reference step (psilora_ds.reference), with the
gradient computed independently by autograd on the dense effective weights."""

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F

from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA, SVDLoRA, find_lora_layers
from psilora_ds.optim import SVDLoRAAdam
from psilora_ds import reference as ref
from psilora_ds.ops.rounds import run_rounds
from psilora_ds.ops.sketch_svd import gradient_sketch_seed, sketch_probes
from psilora_ds.optim.psilora import init_low_rank_momentum

from .models import lora_two_layer_net

f64 = torch.float64


def data(seed=0, N=24):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(N, 12, generator=g, dtype=f64), torch.randn(N, 3, generator=g, dtype=f64)


def model_loss(model, x, t):
    return F.mse_loss(model(x), t)


class DenseTwin:
    """The same network written densely: W_l = W0_l + s_l B_l A_l, gradients by autograd on W_l."""

    def __init__(self, model):
        net = model.base_model.model
        self.layers = find_lora_layers(model)
        self.W0 = [net.fc1.base_layer.weight.detach().clone(), net.fc2.base_layer.weight.detach().clone()]
        self.b = [net.fc1.base_layer.bias.detach().clone(), net.fc2.base_layer.bias.detach().clone()]
        head = net.head.modules_to_save["default"] if hasattr(net.head, "modules_to_save") else net.head
        self.head = (head.weight.detach().clone(), head.bias.detach().clone())
        self.s = [layer.scaling for layer in self.layers]
        self.A = [layer.A.detach().clone() for layer in self.layers]
        self.B = [layer.B.detach().clone() for layer in self.layers]

    def grads(self, x, t):
        """``(P_l, X_l, Z_l)`` per layer and the head's gradients: P = s * dL/dW, Z = s * dL/dy."""
        Ws = [(W0 + s * B @ A).requires_grad_(True) for W0, s, A, B in zip(self.W0, self.s, self.A, self.B)]
        head = [p.clone().requires_grad_(True) for p in self.head]
        y1 = F.linear(x, Ws[0], self.b[0])
        h1 = torch.tanh(y1)
        y2 = F.linear(h1, Ws[1], self.b[1])
        loss = F.mse_loss(F.linear(torch.tanh(y2), *head), t)
        gW1, gW2, gy1, gy2, *g_head = torch.autograd.grad(loss, [*Ws, y1, y2, *head])
        P = [s * g for s, g in zip(self.s, (gW1, gW2))]
        Z = [s * g for s, g in zip(self.s, (gy1, gy2))]
        return P, [x, h1.detach()], Z, g_head


def run_optimizer(opt, model, batches):
    for x, t in batches:
        opt.zero_grad()
        model_loss(model, x, t).backward()
        opt.step()


def assert_factors(layers, A, B, tol=1e-10):
    for layer, a, b in zip(layers, A, B):
        torch.testing.assert_close(layer.A.detach(), a, rtol=tol, atol=tol)
        torch.testing.assert_close(layer.B.detach(), b, rtol=tol, atol=tol)


# fold=True with no budget (cache_max_bytes=None): these small layers' rows go to the dense store; fold=False keeps
# the factored rows.
# reuse=True: the products at the current factors come from autograd's A.grad / B.grad
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("iters", [0, 1, 2])
@pytest.mark.parametrize("momentum,dampening,momentum_prox", [(0.0, 0.0, 0.0), (0.9, 0.1, 0.0), (0.9, 0.1, 0.3)])
def test_psilora_matches_dense_reference(iters, momentum, dampening, momentum_prox, fold, reuse):
    model = lora_two_layer_net(head_trainable=False)
    twin = DenseTwin(model)
    lr, prox = 0.3, 1e-2
    opt = PSILoRA(model, lr, momentum=momentum, dampening=dampening, iters=iters, prox=prox, fold=fold, cache_max_bytes=None,
                  reuse_autograd_grads=reuse, momentum_prox=momentum_prox)
    M = [tuple(init_low_rank_momentum(layer, 1.0).values()) if momentum else None for layer in twin.layers]
    batches = [data(k) for k in range(3)]
    for x, t in batches:
        P, _, _, _ = twin.grads(x, t)
        for i in range(2):
            twin.A[i], twin.B[i], M[i] = ref.psilora_step(
                twin.A[i], twin.B[i], P[i], scaling=twin.s[i], lr=lr, momentum=momentum, dampening=dampening,
                iters=iters, lam=lr * prox, M=M[i], momentum_prox=momentum_prox)
        run_optimizer(opt, model, [(x, t)])
        assert_factors(opt.layers, twin.A, twin.B)
    if momentum:
        for layer, m in zip(opt.layers, M):
            M_A, M_B = opt.state[layer.A]["momentum_A"], opt.state[layer.A]["momentum_B"]
            # the momentum is the product (the factors' signs are the SVD's choice); kept balanced
            torch.testing.assert_close(M_B @ M_A, m[1] @ m[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(M_B.T @ M_B, M_A @ M_A.T, rtol=1e-10, atol=1e-10)
            assert (M_A @ M_A.T - torch.diag(torch.diagonal(M_A @ M_A.T))).abs().max() < 1e-10


def test_preconditioned_lora_is_jacobi_psilora():
    model = lora_two_layer_net(head_trainable=False)
    twin = DenseTwin(model)
    opt = PreconditionedLoRA(model, 0.2, prox=1e-3)
    for x, t in [data(k) for k in range(2)]:
        P, _, _, _ = twin.grads(x, t)
        for i in range(2):
            twin.A[i], twin.B[i], _ = ref.psilora_step(twin.A[i], twin.B[i], P[i], scaling=twin.s[i], lr=0.2,
                                                       iters=0, lam=0.2 * 1e-3)
        run_optimizer(opt, model, [(x, t)])
        assert_factors(opt.layers, twin.A, twin.B)


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("metric", ["kfac", "shampoo", "adafactor"])
@pytest.mark.parametrize("beta1,momentum_prox", [(0.0, 0.0), (0.8, 0.0), (0.8, 0.3)])
def test_scaled_psilora_matches_dense_reference(metric, beta1, momentum_prox, fold, reuse):
    model = lora_two_layer_net(head_trainable=False)
    twin = DenseTwin(model)
    lr, prox, beta2, damping, power, iters = 0.05, 1e-2, 0.9, 1e-3, 0.5, 2
    opt = ScaledPSILoRA(model, lr, betas=(beta1, beta2), iters=iters, prox=prox, damping=damping,
                        metric_power=power, metric=metric, fold=fold, cache_max_bytes=None, reuse_autograd_grads=reuse,
                        momentum_prox=momentum_prox)
    assert opt.defaults["rank_multiplier"] == 2.0  # the default rank-2r momentum (the reference's M below)
    M = [tuple(init_low_rank_momentum(layer, 2.0).values()) if beta1 else None for layer in twin.layers]
    ema_in = [torch.zeros(layer.A.shape[1], dtype=f64) for layer in twin.layers]
    ema_out = [torch.zeros(layer.B.shape[0], dtype=f64) for layer in twin.layers]
    for step, (x, t) in enumerate([data(k) for k in range(3)], start=1):
        P, X, Z, _ = twin.grads(x, t)
        for i in range(2):
            torch.testing.assert_close(Z[i].T @ X[i], P[i])  # the factorization itself
            if metric == "kfac":
                s_in, s_out = ref.kfac_diagonal_stats(X[i], Z[i], twin.s[i])
            elif metric == "shampoo":
                s_in, s_out = ref.shampoo_diagonal_stats(P[i], twin.s[i])
            else:  # the probes the optimizer draws at this step (its steps_taken is step - 1)
                layer = twin.layers[i]
                omega, psi = sketch_probes(layer.out_features, layer.in_features, layer.rank,
                                           gradient_sketch_seed(step - 1, layer.index), dtype=f64,
                                           device=torch.device("cpu"))
                s_in, s_out = ref.adafactor_diagonal_stats(P[i], omega, psi, twin.s[i])
            norm = metric == "adafactor"
            ema_in[i], D_in = ref.ema_metric(ema_in[i], s_in, beta2=beta2, step=step, damping=damping, power=power,
                                             normalized=norm)
            ema_out[i], D_out = ref.ema_metric(ema_out[i], s_out, beta2=beta2, step=step, damping=damping,
                                               power=power, normalized=norm)
            twin.A[i], twin.B[i], M[i] = ref.scaled_psilora_step(
                twin.A[i], twin.B[i], P[i], D_out, D_in, scaling=twin.s[i], lr=lr, beta1=beta1, iters=iters,
                lam=lr * prox, M=M[i], momentum_prox=momentum_prox)
        run_optimizer(opt, model, [(x, t)])
        assert_factors(opt.layers, twin.A, twin.B)
    for layer, e_in, e_out in zip(opt.layers, ema_in, ema_out):
        torch.testing.assert_close(opt.state[layer.A]["metric_in"], e_in)
        torch.testing.assert_close(opt.state[layer.A]["metric_out"], e_out)


@pytest.mark.parametrize("iters", [0, 2])
def test_scaled_psilora_metric_started_at_ones_matches_dense_reference(iters):
    """``metric_init="ones"`` (the paper authors' code, psilora_ds.presets.PAPER): EMAs from ones, no bias
    correction; iters=0 takes the cache-free path."""
    model = lora_two_layer_net(head_trainable=False)
    twin = DenseTwin(model)
    lr, prox, beta1, beta2, damping, power = 0.05, 0.1, 0.0, 0.99, 1e-5, 0.5
    opt = ScaledPSILoRA(model, lr, betas=(beta1, beta2), iters=iters, prox=prox, damping=damping,
                        metric_power=power, metric_init="ones")
    assert opt.cache_free == (iters == 0)
    ema_in = [torch.ones(layer.A.shape[1], dtype=f64) for layer in twin.layers]
    ema_out = [torch.ones(layer.B.shape[0], dtype=f64) for layer in twin.layers]
    for step, (x, t) in enumerate([data(k) for k in range(3)], start=1):
        P, X, Z, _ = twin.grads(x, t)
        for i in range(2):
            s_in, s_out = ref.kfac_diagonal_stats(X[i], Z[i], twin.s[i])
            ema_in[i], D_in = ref.ema_metric(ema_in[i], s_in, beta2=beta2, step=step, damping=damping, power=power,
                                             corrected=False)
            ema_out[i], D_out = ref.ema_metric(ema_out[i], s_out, beta2=beta2, step=step, damping=damping,
                                               power=power, corrected=False)
            twin.A[i], twin.B[i], _ = ref.scaled_psilora_step(
                twin.A[i], twin.B[i], P[i], D_out, D_in, scaling=twin.s[i], lr=lr, beta1=beta1, iters=iters,
                lam=lr * prox)
        run_optimizer(opt, model, [(x, t)])
        assert_factors(opt.layers, twin.A, twin.B)
    with pytest.raises(ValueError, match="metric_init must be one of"):
        ScaledPSILoRA(lora_two_layer_net(), lr, metric_init="identity")


@pytest.mark.parametrize("fold", [True, False])
def test_svdlora_matches_dense_svd(fold):
    model = lora_two_layer_net(head_trainable=False)
    twin = DenseTwin(model)
    opt = SVDLoRA(model, 0.3, fold=fold, cache_max_bytes=None)
    for x, t in [data(k) for k in range(2)]:
        P, _, _, _ = twin.grads(x, t)
        for i in range(2):
            twin.A[i], twin.B[i] = ref.svdlora_step(twin.A[i], twin.B[i], P[i], scaling=twin.s[i], lr=0.3)
        run_optimizer(opt, model, [(x, t)])
        # the split of B A is unique up to signs of singular pairs: compare products
        for layer, a, b in zip(opt.layers, twin.A, twin.B):
            torch.testing.assert_close(layer.B.detach() @ layer.A.detach(), b @ a, rtol=1e-10, atol=1e-12)


def test_svdlora_adam_is_a_projected_torch_adam_step():
    """SVDLoRAAdam against independent computations: torch.optim.Adam on a dense copy of each effective weight's
    gradient gives the full step, then the dense truncated SVD of ``B A + step / s``; over three steps (Adam's moments
    carried), products compared."""
    model = lora_two_layer_net(head_trainable=False)
    twin = DenseTwin(model)
    lr, betas = 0.05, (0.8, 0.95)
    opt = SVDLoRAAdam(model, lr, betas=betas, cache_max_bytes=None)
    weights = [torch.zeros_like(w, requires_grad=True) for w in twin.W0]  # Adam's direction does not depend on W
    adam = torch.optim.Adam(weights, lr=lr, betas=betas, eps=1e-8)
    for x, t in [data(k) for k in range(3)]:
        P, _, _, _ = twin.grads(x, t)
        before = [w.detach().clone() for w in weights]
        for w, p, s in zip(weights, P, twin.s):
            w.grad = p / s  # dL/dW
        adam.step()
        for i, (w, w0) in enumerate(zip(weights, before)):
            target = twin.B[i] @ twin.A[i] + (w.detach() - w0) / twin.s[i]
            U, S, Vh = torch.linalg.svd(target)
            r = twin.A[i].shape[0]
            twin.B[i], twin.A[i] = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
        run_optimizer(opt, model, [(x, t)])
        for layer, a, b in zip(opt.layers, twin.A, twin.B):
            torch.testing.assert_close(layer.B.detach() @ layer.A.detach(), b @ a, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="betas"):
        SVDLoRAAdam(lora_two_layer_net(), 1e-3, betas=(1.0, 0.9))


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clipping_scales_the_step_like_the_dense_clipped_step(max_norm, fold):
    model = lora_two_layer_net(head_trainable=True)
    twin = DenseTwin(model)
    lr = 0.3
    opt = PSILoRA(model, lr, iters=2, max_grad_norm=max_norm, fold=fold, cache_max_bytes=None)
    x, t = data(7)
    P, _, _, g_head = twin.grads(x, t)
    dense_G = [p / s for p, s in zip(P, twin.s)] + g_head
    coef, norm = ref.clip_coefficient(dense_G, max_norm)
    assert (coef < 1.0) == (max_norm < 1.0)
    for i in range(2):
        twin.A[i], twin.B[i], _ = ref.psilora_step(twin.A[i], twin.B[i], coef * P[i], scaling=twin.s[i], lr=lr,
                                                   iters=2, lam=lr * 1e-2)
    model_loss(model, x, t).backward()
    head_grad = [p.grad.clone() for p in opt.other_optimizer.param_groups[0]["params"]]
    opt.step()
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-10)
    assert_factors(opt.layers, twin.A, twin.B)
    for p, g in zip(opt.other_optimizer.param_groups[0]["params"], head_grad):
        torch.testing.assert_close(p.grad, coef * g)


@pytest.mark.parametrize("fold", [False, True])
def test_sketched_clipping_norm_in_one_process(fold):
    """clip_norm_probes=k: the clipping norm is the random-sign sketch (unbiased, within 4 of the largest standard
    deviation it can have, Gaussian probes', computed from the dense gradients' spectra; over 400 seeds its mean is the
    exact value), and the step is the dense step clipped with that estimate."""
    k, max_norm, lr = 16, 0.05, 0.3
    model = lora_two_layer_net(head_trainable=True)
    twin = DenseTwin(model)
    opt = PSILoRA(model, lr, iters=2, max_grad_norm=max_norm, clip_norm_probes=k, fold=fold, cache_max_bytes=None)
    x, t = data(7)
    P, _, _, g_head = twin.grads(x, t)
    G = [p / s for p, s in zip(P, twin.s)]
    _, exact = ref.clip_coefficient(G + g_head, max_norm)
    std = float(torch.sqrt(sum(2 * (g.T @ g).square().sum() / k for g in G)))
    model_loss(model, x, t).backward()
    batches = {i: b for i, b in opt.capture._batches.items()}
    opt.step()
    est = opt.last_grad_norm
    assert est != pytest.approx(exact, rel=1e-6) and abs(est**2 - exact**2) <= 4 * std
    coef = min(1.0, max_norm / (est + 1e-6))
    for i in range(2):
        twin.A[i], twin.B[i], _ = ref.psilora_step(twin.A[i], twin.B[i], coef * P[i], scaling=twin.s[i], lr=lr,
                                                   iters=2, lam=lr * 1e-2)
    assert_factors(opt.layers, twin.A, twin.B)
    # unbiased: average the per-layer estimate over many seeds (steps)
    layer = opt.layers[0]
    grad = opt.planner.layer_gradient(0, batches[0], batches[0].rows)
    samples = []
    for step in range(400):
        samples.append(float(run_rounds(opt.distributor.lora_norm_sq(layer, grad, step), None)))
    exact0 = float(P[0].square().sum())
    std0 = float(torch.sqrt(2 * (P[0].T @ P[0]).square().sum() / k))
    assert abs(sum(samples) / len(samples) - exact0) <= 4 * std0 / 400**0.5


OPTIMIZERS = {
    "psilora": lambda m, **kw: PSILoRA(m, 0.1, momentum=0.9, iters=2, **kw),
    "scaled_kfac": lambda m, **kw: ScaledPSILoRA(m, 1e-2, iters=1, **kw),
    "scaled_shampoo": lambda m, **kw: ScaledPSILoRA(m, 1e-2, metric="shampoo", rank_multiplier=0.25, **kw),
    "precond": lambda m, **kw: PreconditionedLoRA(m, 0.1, **kw),
    "svdlora": lambda m, **kw: SVDLoRA(m, 0.1, momentum=0.5, **kw),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_resumes_identically(name):
    batches = [data(k) for k in range(4)]

    def build():
        model = lora_two_layer_net(head_trainable=True, nonzero_B=False)
        opt = OPTIMIZERS[name](model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return model, opt, sched

    def train(model, opt, sched, bs):
        for x, t in bs:
            opt.zero_grad()
            model_loss(model, x, t).backward()
            opt.step()
            sched.step()

    model, opt, sched = build()
    train(model, opt, sched, batches)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = build()
    train(model, opt, sched, batches[:2])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2, opt2, sched2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.lora_group["lr"] == opt.lora_group["lr"]
    assert opt2.param_groups[0] is opt2.other_optimizer.param_groups[0]
    assert opt2.param_groups[-1] is opt2.lora_group
    train(model2, opt2, sched2, batches[2:])
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_runs_under_bf16_autocast_and_loss_falls(name):
    torch.manual_seed(0)
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = OPTIMIZERS[name](model, other_lr=1e-2)  # the toy head's AdamW lr (the default is 1e-4)
    x, t = (v.float() for v in data(3, N=64))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model_loss(model, x, t)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for layer in opt.layers:
        assert layer.A.dtype == torch.float32 and torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all()
    assert losses[-1] < 0.9 * losses[0], losses


def test_non_finite_factors_skip_the_whole_step():
    model = lora_two_layer_net(head_trainable=True)
    opt = ScaledPSILoRA(model, 1e-2)
    x, t = data(0)
    model_loss(model, x, t).backward()
    opt.step()
    before = copy.deepcopy({k: v.clone() for k, v in model.state_dict().items()})
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    (model_loss(model, x, t) * float("inf")).backward()
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    after = opt.state_dict()
    for name, st in state_before["layers"].items():
        for k, v in st.items():
            torch.testing.assert_close(after["layers"][name][k], v, rtol=0, atol=0)
    opt.zero_grad()
    model_loss(model, x, t).backward()
    opt.step()  # the next finite step proceeds
    assert opt.state_dict()["layers"][opt.layers[0].name]["step"] == 2


def test_a_diverged_run_is_told_apart_from_a_transient_overflow(caplog):
    """A non-finite gradient with finite factors is a warning (the next step may be fine); factors that are
    themselves non-finite (the run diverged) make every later step skip: an error that says so."""
    model = lora_two_layer_net(head_trainable=True)
    opt = ScaledPSILoRA(model, 1e-2)
    x, t = data(0)
    with caplog.at_level(logging.WARNING, logger="psilora_ds.optim.base"):
        (model_loss(model, x, t) * float("inf")).backward()
        opt.step()
        opt.zero_grad()
        transient = [r for r in caplog.records if "skipped" in r.getMessage()]
        assert len(transient) == 1 and transient[0].levelno == logging.WARNING
        assert "diverged" not in transient[0].getMessage()
        caplog.clear()
        with torch.no_grad():
            opt.layers[1].B[0, 0] = float("nan")
        model_loss(model, x, t).backward()
        opt.step()
    diverged = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(diverged) == 1 and diverged[0].levelno == logging.ERROR and "diverged" in diverged[0].getMessage()
    assert opt.skipped_steps == 2


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("at_step", [0, 1])  # 0: B = 0 (peft's init), 1: B != 0
@pytest.mark.parametrize("where", ["z", "x"])
@pytest.mark.parametrize("fold", [False, True])
def test_one_non_finite_entry_skips_the_step(reuse, at_step, where, fold):
    """A single inf in one layer's output gradient Z (an fp16 overflow) or a single NaN in its input X
    (the head's rows: fc2's input is tanh(.), so fc1's output is poisoned) skips the step, whether the
    check reads the rows or autograd's LoRA gradients."""
    model = lora_two_layer_net(head_trainable=True)
    # fold False: the rows (or autograd's products) are checked, True: the dense store
    opt = PSILoRA(model, 0.1, momentum=0.9, reuse_autograd_grads=reuse, fold=fold, cache_max_bytes=None)
    x, t = data(0)
    for _ in range(at_step):
        model_loss(model, x, t).backward()
        opt.step()
        opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = model.base_model.model

    def poison_z(module, grad_output):
        g = grad_output[0].clone()
        g[3, 1] = float("inf")
        return (g,)

    if where == "z":
        handle = net.fc2.register_full_backward_pre_hook(poison_z)
        xin = x
    else:
        handle = None
        xin = x.clone()
        xin[5, 2] = float("nan")
    loss = F.mse_loss(model(xin)[torch.arange(len(x)) != 5], t[torch.arange(len(x)) != 5]) if where == "x" \
        else model_loss(model, xin, t)
    loss.backward()
    if handle is not None:
        handle.remove()
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_layer_that_captured_nothing_keeps_factors_and_state():
    model = lora_two_layer_net(head_trainable=False)
    opt = PSILoRA(model, 0.1, momentum=0.9)
    x, t = data(1)
    model_loss(model, x, t).backward()
    opt.step()
    fc2 = opt.layers[1]
    A, B = fc2.A.detach().clone(), fc2.B.detach().clone()
    state = {k: v.clone() for k, v in opt.state[fc2.A].items()}
    A1 = opt.layers[0].A.detach().clone()
    # a forward that bypasses fc2's adapter: only fc1 captures
    net = model.base_model.model
    net.fc2.enable_adapters(False)
    model_loss(model, x, t).backward()
    net.fc2.enable_adapters(True)
    opt.step()
    assert not torch.equal(opt.layers[0].A, A1)
    torch.testing.assert_close(fc2.A.detach(), A, rtol=0, atol=0)
    torch.testing.assert_close(fc2.B.detach(), B, rtol=0, atol=0)
    for k, v in state.items():
        torch.testing.assert_close(opt.state[fc2.A][k], v, rtol=0, atol=0)


def test_scheduler_drives_lora_and_other_groups():
    model = lora_two_layer_net(head_trainable=True)
    opt = PSILoRA(model, 0.5, other_optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 * (step + 1))
    assert opt.lora_group["lr"] == pytest.approx(0.05)
    assert opt.other_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    x, t = data(0)
    model_loss(model, x, t).backward()
    opt.step()
    sched.step()
    assert opt.other_optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize("lr", [0.2, 1e-3])
def test_other_parameters_get_their_own_lr_whatever_the_lora_lr(lr, caplog):
    """The head goes to AdamW at 1e-4 by default (not at PSI-LoRA's effective-weight lr), said once."""
    import logging

    with caplog.at_level(logging.INFO, logger="psilora_ds.optim.base"):
        opt = PSILoRA(lora_two_layer_net(head_trainable=True), lr)
    assert isinstance(opt.other_optimizer, torch.optim.AdamW)
    assert opt.other_optimizer.param_groups[0]["lr"] == 1e-4 and opt.lora_group["lr"] == lr
    said = [r.getMessage() for r in caplog.records if "other trainable" in r.getMessage()]
    assert len(said) == 1 and f"(lr {lr:g})" in said[0] and "AdamW (lr 0.0001)" in said[0], said
    opt = PSILoRA(lora_two_layer_net(head_trainable=True), lr, other_lr=3e-5)
    assert opt.other_optimizer.param_groups[0]["lr"] == 3e-5
    with pytest.raises(ValueError, match="other_lr must be >= 0"):
        PSILoRA(lora_two_layer_net(head_trainable=True), lr, other_lr=-1.0)


@pytest.mark.parametrize("build", [lambda m: ScaledPSILoRA(m, 1e-2, rank_multiplier=4.0),
                                   lambda m: PSILoRA(m, 0.1, momentum=0.9, rank_multiplier=4.0)])
def test_a_momentum_rank_above_a_layer_s_width_is_that_width(build):
    # r 4 x 4 = 16 on fc1 (12 -> 16) and fc2 (16 -> 10): full rank, 12 and 10 (the factors of a wider momentum could
    # not be balanced: the default rank 2 r once crashed on a 16-wide k_proj at r 16)
    model = lora_two_layer_net(head_trainable=False)
    opt = build(model)
    for k in range(2):
        x, t = data(k)
        model_loss(model, x, t).backward()
        opt.step()
        opt.zero_grad()
    layers = find_lora_layers(model)
    assert [opt.state[layer.A]["momentum_A"].shape for layer in layers] == [(12, 12), (10, 16)]
    assert [opt.state[layer.A]["momentum_B"].shape for layer in layers] == [(16, 12), (10, 10)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [PSILoRA, ScaledPSILoRA, SVDLoRA])
def test_an_adapter_wider_than_its_layer_is_a_one_line_error(cls):
    # r 12 fits fc1 (12 -> 16), not fc2 (16 -> 10): the balancing crashed there with a broadcast error
    with pytest.raises(ValueError) as info:
        cls(lora_two_layer_net(r=12), 0.1)
    assert "LoRA rank 12 exceeds the width of" in str(info.value) and "fc2" in str(info.value)
    assert "use a rank <= 10" in str(info.value) and "\n" not in str(info.value)
    cls(lora_two_layer_net(r=10), 0.1)  # r = min(m, n) is allowed


def test_bad_hyperparameters_are_one_line_errors():
    model = lora_two_layer_net()
    for kwargs in (dict(momentum=1.5), dict(iters=-1), dict(rank_multiplier=0)):
        with pytest.raises(ValueError) as info:
            PSILoRA(model, 0.1, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="metric"):
        ScaledPSILoRA(model, 1e-3, metric="adam")


def test_one_call_per_param_group_equals_one_call():
    """ZeRO engines call step() once per param group with param_groups narrowed to it."""
    batches = [data(k) for k in range(3)]

    def run(per_group):
        model = lora_two_layer_net(head_trainable=True)
        opt = ScaledPSILoRA(model, 1e-2, iters=2, max_grad_norm=0.05)
        for x, t in batches:
            model_loss(model, x, t).backward()
            if per_group:
                everything = opt.param_groups
                for group in everything:
                    opt.param_groups = [group]
                    opt.step()
                opt.param_groups = everything
            else:
                opt.step()
            opt.zero_grad()
        return model.state_dict(), opt.steps_taken

    (a, steps_a), (b, steps_b) = run(False), run(True)
    assert steps_a == steps_b == 3
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_sharded_checkpoint_on_another_world_size_is_a_clear_error():
    model = lora_two_layer_net(head_trainable=False)
    opt = PSILoRA(model, 0.1, momentum=0.9)
    x, t = data(0)
    model_loss(model, x, t).backward()
    opt.step()
    sd = opt.state_dict()
    sd["layout"] = {"world_size": 2, "sharded": True, "owners": [0, 1]}
    # as rank 0 of 2 would have saved it: layer 1's tensors live on rank 1's file
    sd["layers"][opt.layers[1].name] = {"initialized": True}
    with pytest.raises(ValueError, match="with 2 ranks") as info:
        opt.load_state_dict(sd)
    assert "\n" not in str(info.value)


def test_state_nbytes_counts_the_state_dict_tensors():
    model = lora_two_layer_net(head_trainable=False)
    opt = ScaledPSILoRA(model, 1e-2)  # the default rank-2r momentum + two metric vectors per layer
    x, t = data(0)
    model_loss(model, x, t).backward()
    opt.step()
    expected = sum(8 * ((2 * l.rank + 1) * (l.in_features + l.out_features)) for l in opt.layers)  # float64
    assert opt.state_nbytes() == expected


def test_every_optimizer_takes_the_shared_options():
    """One constructor signature: the family's shared options reach every optimizer (SVDLoRA included);
    an unknown keyword names the valid ones."""
    from psilora_ds import LoRAOptimizer
    from psilora_ds.distributed import Distributor

    for cls in (PSILoRA, ScaledPSILoRA, PreconditionedLoRA, SVDLoRA):
        d = Distributor()
        opt = cls(lora_two_layer_net(), 0.1, max_grad_norm=0.5, clip_norm_probes=8, distributor=d, cache_max_bytes=123,
                  fold=False, reuse_autograd_grads=False, cache_free=False)
        assert isinstance(opt, LoRAOptimizer) and opt.distributor is d and d.norm_probes == 8
        assert (opt.max_grad_norm, opt.capture.max_bytes, opt.capture.fold, opt.reuse_autograd_grads) == \
            (0.5, 123, False, False)
        with pytest.raises(TypeError, match="unexpected keyword argument.*max_grad_norm, clip_norm_probes"):
            cls(lora_two_layer_net(), 0.1, clip=1.0)


@pytest.mark.parametrize("make,expected", [
    # step: 2 iterations x 2 half-steps; momentum: same; + 1: the momentum's balancing (ops.balance, its Gram route)
    (lambda m: PSILoRA(m, 1e-2, iters=2, momentum=0.9), 4 + 4 + 1),
    (lambda m: ScaledPSILoRA(m, 1e-2, iters=1), 2 + 2 + 1),
    (lambda m: ScaledPSILoRA(m, 1e-2, iters=0, cache_free=True), 2 + 2 + 1),  # Jacobi: A- and B-step, then momentum
    (lambda m: PreconditionedLoRA(m, 1e-2), 2),
])
def test_solves_are_batched_over_the_layers(monkeypatch, make, expected):
    """The r x r systems of every layer are factored together, round by round: the number of Cholesky
    factorizations per step (each followed by the solve's one host sync; the balancing's reads nothing) does not grow
    with the layer count."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    counts = {}
    for layers in (1, 4):
        torch.manual_seed(0)
        net = nn.Sequential(*[nn.Linear(10, 10) for _ in range(layers)])
        model = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=[str(i) for i in range(layers)],
                                               init_lora_weights="gaussian"))
        opt = make(model)
        for step in range(2):
            model(torch.randn(8, 10)).square().mean().backward()
            calls = []
            real = torch.linalg.cholesky_ex
            monkeypatch.setattr(torch.linalg, "cholesky_ex",
                                lambda G, **kw: calls.append(G.shape[:-2].numel()) or real(G, **kw))
            opt.step()
            monkeypatch.setattr(torch.linalg, "cholesky_ex", real)
            opt.zero_grad()
        assert all(batch == layers for batch in calls), calls  # every layer's system in each factorization
        counts[layers] = len(calls)
    assert counts[1] == counts[4] == expected
