"""The spectral first step (LoRA-One, arXiv 2502.01235): from peft's B = 0, ``first_step_iters`` inner
iterations on the first step give the truncated SVD of the first full gradient step (the SVDLoRA oracle at
B = 0), in one process and on 2 ranks. Cache-free (Jacobi) optimizers keep no rows for it: their hooks take a
two-sided sketch of the step's gradient, reconstructed to rank r (ops/sketch_svd.py; exact when the gradient's rank is
at most the sketch's, the dense reference's reconstruction otherwise)."""

import pytest
import torch
import torch.nn.functional as F

from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA
from psilora_ds import reference as ref
from psilora_ds.ops import svd_project, weighted_svd_project
from psilora_ds.ops.sketch_svd import gradient_sketch_seed, sketch_probes

from .distributed import run_distributed
from .models import lora_two_layer_net
from .test_optimizers import DenseTwin, data

f64 = torch.float64
LR, K = 0.3, 60


def rel(a, b):
    return float((a - b).norm() / b.norm())


def first_step_targets(model, x, t, metric=None, beta1=0.9, beta2=0.99, damping=1e-5, power=1.0):
    """Per layer: the product ``B'A'`` of the oracle's first step, ``svd_r(-eta' P)`` (Scaled: the metric-weighted
    best rank-r approximation of ``-eta' (1 - beta1) D_out^-1 P D_in^-1``, the metric at ScaledPSILoRA's default K-FAC
    power 1), from the dense float64 gradient."""
    twin = DenseTwin(model)
    P, X, Z, _ = twin.grads(x, t)
    out = []
    for i, layer in enumerate(twin.layers):
        assert float(twin.B[i].norm()) == 0.0  # peft's start
        T = -(LR / twin.s[i] ** 2) * P[i]
        if metric is None:
            A, B = svd_project(T, layer.rank)
        else:
            s_in, s_out = ref.kfac_diagonal_stats(X[i], Z[i], twin.s[i])
            _, D_in = ref.ema_metric(torch.zeros_like(s_in), s_in, beta2=beta2, step=1, damping=damping, power=power)
            _, D_out = ref.ema_metric(torch.zeros_like(s_out), s_out, beta2=beta2, step=1, damping=damping,
                                      power=power)
            A, B = weighted_svd_project((1 - beta1) * T / D_out[:, None] / D_in[None, :], layer.rank, D_out, D_in)
        out.append(B @ A)
    return out


def make(name, model, **kw):
    if name == "psilora":
        return PSILoRA(model, LR, momentum=0.9, iters=1, first_step_iters=K, **kw)
    if name == "preconditioned":  # cache-free after its first step
        return PreconditionedLoRA(model, LR, first_step_iters=K, **kw)
    return ScaledPSILoRA(model, LR, betas=(0.9, 0.99), iters=0, damping=1e-5, first_step_iters=K, **kw)


@pytest.mark.parametrize("name", ["psilora", "preconditioned", "scaled"])
def test_first_step_is_the_truncated_svd_of_the_first_full_step(name):
    """On rows (psilora, iters=1) for any batch; cache-free from the sketch, exact here since the batch's 6 rows make
    ``rank(P) <= 6 <= k = 9``."""
    model = lora_two_layer_net(nonzero_B=False, head_trainable=False)
    x, t = data(0) if name == "psilora" else data(0, N=6)
    targets = first_step_targets(model, x, t, metric="kfac" if name == "scaled" else None)
    opt = make(name, model)
    F.mse_loss(model(x), t).backward()
    opt.step()
    opt.zero_grad()
    for layer, target in zip(opt.layers, targets):
        assert rel(layer.B.detach() @ layer.A.detach(), target) <= 1e-6
        # balanced split, like the oracle's B = U S^1/2, A = S^1/2 V^T
        torch.testing.assert_close(layer.A.detach() @ layer.A.detach().T, layer.B.detach().T @ layer.B.detach())
    # later steps are ordinary ones, and a cache-free optimizer is cache-free again
    F.mse_loss(model(x), t).backward()
    opt.step()
    assert opt.last_cache_bytes == 0 if name != "psilora" else opt.last_cache_bytes > 0


def test_a_warm_up_step_at_lr_0_defers_the_spectral_step():
    """A warm-up schedule's first step has lr 0: the spectral step is the first step with lr > 0 (taken at lr 0
    it would leave B = 0 and the option would do nothing, as it once did in the recipe, whose warm-up starts at 0)."""
    model = lora_two_layer_net(nonzero_B=False, head_trainable=False)
    x, t = data(0, N=6)
    targets = first_step_targets(model, x, t)
    opt = PreconditionedLoRA(model, LR, first_step_iters=K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s))  # lr 0, then LR
    for step in range(2):
        F.mse_loss(model(x), t).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step == 0:  # nothing moved: B is still peft's zero, so the next gradient is the same
            assert not opt.spectral_done and all(float(layer.B.norm()) == 0 for layer in opt.layers)
    assert opt.spectral_done
    for layer, target in zip(opt.layers, targets):
        assert rel(layer.B.detach() @ layer.A.detach(), target) <= 1e-6
    resumed = PreconditionedLoRA(lora_two_layer_net(nonzero_B=False, head_trainable=False), LR, first_step_iters=K)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.spectral_done


def test_without_first_step_iters_the_first_step_is_not_the_svd():
    """The test above can fail: one Jacobi step from B = 0 is far from the oracle."""
    model = lora_two_layer_net(nonzero_B=False, head_trainable=False)
    x, t = data(0)
    targets = first_step_targets(model, x, t)
    opt = PreconditionedLoRA(model, LR)
    F.mse_loss(model(x), t).backward()
    opt.step()
    assert min(rel(layer.B.detach() @ layer.A.detach(), target) for layer, target in zip(opt.layers, targets)) > 0.1


def test_first_step_iters_must_be_positive():
    with pytest.raises(ValueError, match="first_step_iters must be >= 1"):
        PSILoRA(lora_two_layer_net(), LR, first_step_iters=0)


def ddp_worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel

    from psilora_ds.distributed import DDPDistributor

    model = lora_two_layer_net(nonzero_B=False, head_trainable=False)
    x, t = data(0, N=6)  # 3 rows per rank; the sketch of the whole batch is exact (rank 6 <= k)
    targets = first_step_targets(model, x, t)  # the whole batch, densely
    opt = make("preconditioned", model, distributor=DDPDistributor(shard_state=True))
    half = x.shape[0] // 2
    rows = slice(rank * half, (rank + 1) * half)
    F.mse_loss(DistributedDataParallel(model)(x[rows]), t[rows]).backward()
    opt.step()
    torch.save([rel(layer.B.detach() @ layer.A.detach(), target) for layer, target in zip(opt.layers, targets)],
               out / f"rank{rank}.pt")


@pytest.mark.slow
def test_first_step_on_two_ranks_is_the_truncated_svd_of_the_whole_batch(tmp_path):
    run_distributed(ddp_worker, 2, tmp_path)
    for rank in range(2):
        assert max(torch.load(tmp_path / f"rank{rank}.pt")) <= 1e-6


@pytest.mark.parametrize("name", ["preconditioned", "scaled"])
def test_a_cache_free_first_step_is_the_dense_sketch_reconstruction(name):
    """A batch of 24 rows (``rank(P) = 12 > k = 9`` at fc1): the cache-free first step is the dense float64
    reconstruction from the same probes (1e-9), which is not the exact truncated SVD but within the sketch's error."""
    model = lora_two_layer_net(nonzero_B=False, head_trainable=False)
    x, t = data(0)
    twin = DenseTwin(model)
    P, X, Z, _ = twin.grads(x, t)
    exact = first_step_targets(model, x, t, metric="kfac" if name == "scaled" else None)
    opt = make(name, model)
    F.mse_loss(model(x), t).backward()
    opt.step()
    for i, layer in enumerate(opt.layers):
        T = -(LR / twin.s[i] ** 2) * P[i]
        d_out = d_in = None
        if name == "scaled":  # as first_step_targets: the metric of the first step, and (1 - beta1) P
            s_in, s_out = ref.kfac_diagonal_stats(X[i], Z[i], twin.s[i])
            d_in = ref.ema_metric(torch.zeros_like(s_in), s_in, beta2=0.99, step=1, damping=1e-5, power=1.0)[1]
            d_out = ref.ema_metric(torch.zeros_like(s_out), s_out, beta2=0.99, step=1, damping=1e-5, power=1.0)[1]
            T = 0.1 * T / d_out[:, None] / d_in[None, :]
        omega, psi = sketch_probes(layer.out_features, layer.in_features, layer.rank,  # step 0's (every rank's)
                                   gradient_sketch_seed(0, layer.index), dtype=f64, device=torch.device("cpu"))
        A, B = ref.sketched_spectral_step_dense(T, layer.rank, omega, psi, d_out, d_in)
        got = layer.B.detach() @ layer.A.detach()
        assert rel(got, B @ A) <= 1e-9
        assert 1e-4 < rel(got, exact[i]) < 0.5
    assert opt.spectral_done


@pytest.mark.parametrize("warm_up", [False, True])
def test_a_cache_free_run_keeps_no_rows_and_says_what_its_first_step_holds(caplog, warm_up):
    """No step of a cache-free run holds rows (``last_cache_bytes == 0`` throughout); the memory line says the first
    step's sketches and their size, and the ordinary steps' products (each said once). A warm-up step at lr 0 takes
    no sketch (it is not the spectral step)."""
    import logging

    model = lora_two_layer_net(nonzero_B=False, head_trainable=False)
    x, t = data(0)
    opt = PreconditionedLoRA(model, LR, first_step_iters=K)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s) if warm_up else 1.0)
    assert opt.cache_free
    cache = []
    with caplog.at_level(logging.INFO, logger="psilora_ds"):
        for _ in range(3):
            F.mse_loss(model(x), t).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            cache.append(opt.last_cache_bytes)
    assert cache == [0, 0, 0] and opt.spectral_done
    lines = [r.getMessage() for r in caplog.records if "capture" in r.getMessage() and "MiB" in r.getMessage()]
    assert len(lines) == 2, lines
    assert all("no activation rows kept" in line for line in lines)
    sketched = [line for line in lines if "two-sided gradient sketches" in line]
    assert len(sketched) == 1 and sketched[0] == lines[1 if warm_up else 0]
    # fc1 (16 x 12, r 4: k 9, l 16): Y 16 x 9, W 16 x 12; fc2 (10 x 16: k 9, l 10): Y 10 x 9, W 10 x 16; float64
    assert f"sketches, {(16 * 9 + 16 * 12 + 10 * 9 + 10 * 16) * 8 / 2**20:.3g} MiB" in sketched[0]
