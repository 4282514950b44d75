"""Cache-free Jacobi steps (METHOD.md section 6): thin products accumulated in the capture hooks equal
the cached-rows implementation, keep no rows, and refuse what they cannot serve."""

import logging

import pytest
import torch
import torch.nn.functional as F

from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA, SVDLoRA
from psilora_ds.distributed import Distributor
from psilora_ds.distributed.base import DEFAULT_NORM_PROBES
from psilora_ds.ops import thin_products
from psilora_ds.products import ProductCapture, StaleFactorsError

from .distributed import fsdp2_sharded, regression_batches, rel_err, run_distributed
from .models import lora_two_layer_net

STEPS, ACC, B = 4, 3, 4  # optimizer steps, micro-batches per step, rows per micro-batch and rank
CLIP = 0.05  # below the gradient norm of these steps: clipping is active


def make(name, model, **kw):
    if name == "preconditioned":
        return PreconditionedLoRA(model, 0.2, **kw)
    if name == "psilora":
        return PSILoRA(model, 0.2, momentum=0.9, iters=0, **kw)
    if name == "scaled-adafactor":  # its statistics from the two-sided sketch the hooks take at every step
        return ScaledPSILoRA(model, 1e-2, betas=(0.9, 0.99), iters=0, damping=1e-6, metric="adafactor", **kw)
    return ScaledPSILoRA(model, 1e-2, betas=(0.9, 0.99), iters=0, damping=1e-6, **kw)


NAMES = ("preconditioned", "psilora", "scaled", "scaled-adafactor")


def test_thin_products_against_the_dense_gradient():
    g = torch.Generator().manual_seed(0)
    N, m, n, q, k = 50, 7, 9, 5, 4
    Z, X = torch.randn(N, m, generator=g, dtype=torch.float64), torch.randn(N, n, generator=g, dtype=torch.float64)
    left, right = torch.randn(m, q, generator=g, dtype=torch.float64), torch.randn(q, n, generator=g, dtype=torch.float64)
    omega = torch.randn(n, k, generator=g, dtype=torch.float64)
    omega_s, psi = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(6, m, generator=g, dtype=torch.float64)
    P = Z.T @ X
    # fused (every right product in one pair of matrix products, every left one in another), with and without probes
    lp, rp, sx, sz, sk, ys, ws = thin_products(Z, X, left, right, omega, two_sided=(omega_s, psi))
    for got, want in ((lp, left.T @ P), (rp, P @ right.T), (sx, (X**2).sum(0)), (sz, (Z**2).sum(0)), (sk, P @ omega),
                      (ys, P @ omega_s), (ws, psi @ P)):
        assert got.is_contiguous() and rel_err(got, want) < 1e-13
    lp, rp, sx, sz, sk, ys, ws = thin_products(Z, X, left, right)
    assert sk is None and ys is None and ws is None
    assert rel_err(lp, left.T @ P) < 1e-13 and rel_err(rp, P @ right.T) < 1e-13
    _, _, _, _, sk, ys, ws = thin_products(Z, X, left, right, None, two_sided=(omega_s, psi))
    assert sk is None and rel_err(ys, P @ omega_s) < 1e-13 and rel_err(ws, psi @ P) < 1e-13
    lp, rp, sx, sz, *_ = thin_products(Z, X, left, right, row_sums=False)  # (no K-FAC metric: no row sums)
    assert sx is None and sz is None and rel_err(lp, left.T @ P) < 1e-13


@pytest.mark.parametrize("name", NAMES)
def test_the_hooks_take_the_kfac_sums_only_for_the_kfac_metric(name):
    """The K-FAC row sums (m + n numbers per layer, summed over ranks) are taken by the K-FAC metric's steps only."""
    model = lora_two_layer_net(dtype=torch.float32, nonzero_B=False)
    opt = make(name, model, cache_free=True)
    x, t = next(iter(regression_batches(5, 1, 2 * B)))
    F.mse_loss(model(x), t).backward()
    held = opt.capture._batches.values()
    assert all((p.sum_x2 is not None) == (name == "scaled") for p in held) and held
    opt.step()


def one_process_run(name, cache_free, *, clip=CLIP, dtype=torch.float32, seed=5, weights=None, **kw):
    model = lora_two_layer_net(dtype=dtype, head_trainable=True, nonzero_B=False)
    if weights is not None:
        model.load_state_dict(weights)
    # (the probes several ranks take by default: the 2-rank runs are held to this one)
    opt = make(name, model, cache_free=cache_free, max_grad_norm=clip, clip_norm_probes=DEFAULT_NORM_PROBES,
               accumulation_steps=ACC, **kw)
    cache = []
    for step, (x, t) in enumerate(regression_batches(seed, STEPS * ACC, 2 * B)):
        F.mse_loss(model(x.to(dtype)), t.to(dtype)).div(ACC).backward()
        if step % ACC == ACC - 1:
            opt.step()
            opt.zero_grad()
            cache.append(opt.last_cache_bytes)
    return opt, {layer.name: (layer.A.detach().clone(), layer.B.detach().clone()) for layer in opt.layers}, cache


@pytest.mark.parametrize("name", NAMES)
def test_one_process_cache_free_equals_the_cached_rows(name):
    """Accumulation over 3 micro-batches, clipping by the default 16-probe sketch in both: the same factors (2e-6,
    fp32: 1.2e-6 measured for the Adafactor metric with the default rank-2r momentum; exact in float64, the next test),
    the same norm, and no rows held (the cached run held some)."""
    rows_opt, rows, rows_cache = one_process_run(name, cache_free=False)
    free_opt, free, free_cache = one_process_run(name, cache_free=True)
    assert free_opt.cache_free and not rows_opt.cache_free
    for layer, (A, B_) in rows.items():
        assert rel_err(free[layer][0], A) <= 2e-6 and rel_err(free[layer][1], B_) <= 2e-6
    assert free_opt.last_grad_norm == pytest.approx(rows_opt.last_grad_norm, rel=1e-6)
    assert free_opt.last_grad_norm > CLIP  # clipping was active
    assert free_cache == [0] * STEPS and min(rows_cache) > 0
    assert free_opt.capture.autograd_reuse == "on" and rows_opt.planner.autograd.state == "on"  # steps 2-4 took autograd's LoRA gradients for (B^T P, P A^T)


@pytest.mark.parametrize("name", NAMES)
def test_autograd_gradients_stand_for_the_products_at_the_factors(name, caplog):
    """One process, cache-free: the first step checks autograd's LoRA gradients against the products at (A, B) (logged),
    later steps take only the momentum factors' products in the hooks (none without momentum) and read A.grad, B.grad
    instead, which the planning clears; the factors equal a run that keeps taking the products (2e-6, fp32)."""
    with caplog.at_level(logging.INFO, logger="psilora_ds.optim.autograd_grads"):
        reuse, with_reuse, _ = one_process_run(name, cache_free=True)
    assert "from autograd" in caplog.text
    products, without, _ = one_process_run(name, cache_free=True, reuse_autograd_grads=False)
    assert reuse.capture.autograd_reuse == "on" and products.capture.autograd_reuse == "off"
    for layer, (A, B_) in without.items():
        assert rel_err(with_reuse[layer][0], A) <= 2e-6 and rel_err(with_reuse[layer][1], B_) <= 2e-6
    assert all(layer.A.grad is None and layer.B.grad is None for layer in reuse.layers)  # cleared by the planning
    # the hooks' products of one more micro-batch: r (m + n) fewer numbers per layer once the gradients stand for them
    held = {}
    for flag in (True, False):
        model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
        opt = make(name, model, cache_free=True, max_grad_norm=CLIP, reuse_autograd_grads=flag)
        for x, t in regression_batches(5, 2, 2 * B):
            F.mse_loss(model(x), t).backward()
            held[flag] = opt.capture.nbytes
            opt.step()
            opt.zero_grad()
    saved = sum(layer.rank * (layer.in_features + layer.out_features) for layer in opt.layers) * 4
    assert held[False] - held[True] == saved


def test_autograd_gradients_gone_at_the_step_are_an_error():
    """A step whose hooks left the products at (A, B) to autograd finds no A.grad: a one-line error, not a step."""
    model = lora_two_layer_net(dtype=torch.float32, nonzero_B=False)
    opt = make("scaled", model, cache_free=True)
    for i, (x, t) in enumerate(regression_batches(5, 2, 2 * B)):
        F.mse_loss(model(x), t).backward()
        if i == 1:
            opt.layers[0].lora_A.weight.grad = None
            with pytest.raises(RuntimeError, match="reuse_autograd_grads=False"):
                opt.step()
        else:
            opt.step()
            opt.zero_grad()


class PartitionedGradsDistributor(Distributor):
    """One process whose engine, like DeepSpeed ZeRO, does not leave ``A.grad``/``B.grad`` whole at the step."""

    def lora_grads_are_whole(self) -> bool:
        return False


@pytest.mark.parametrize("name", NAMES)
def test_factor_gradients_summed_in_the_hooks_stand_for_the_products(name, caplog):
    """Where the engine does not leave autograd's LoRA gradients whole at the step (ZeRO; here a one-process
    distributor that says so), the cache-free hooks sum each micro-batch's (hooks on the factors) with the products
    instead of computing the products at (A, B): checked against them on the first step (logged), then taken; the
    factors equal a run that computes them (2e-6, fp32, 3 micro-batches per step); ``p.grad`` is left to the engine;
    the hooks' products have r fewer columns on each side, the factor gradients the same numbers in their place."""
    with caplog.at_level(logging.INFO, logger="psilora_ds.optim.autograd_grads"):
        summed, with_grads, _ = one_process_run(name, cache_free=True, distributor=PartitionedGradsDistributor())
    assert "from autograd" in caplog.text
    assert summed.planner.autograd.from_capture and summed.capture.autograd_reuse == "on"
    _, computed, _ = one_process_run(name, cache_free=True, reuse_autograd_grads=False)
    for layer, (A, B_) in computed.items():
        assert rel_err(with_grads[layer][0], A) <= 2e-6 and rel_err(with_grads[layer][1], B_) <= 2e-6
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = make(name, model, cache_free=True, distributor=PartitionedGradsDistributor())
    for x, t in regression_batches(5, 2, 2 * B):
        F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    F.mse_loss(model(x), t).backward()
    batches = opt.capture.pop()  # (one more micro-batch's, taken as the step would)
    for idx, layer in enumerate(opt.layers):
        grads = batches[idx].factor_grads
        torch.testing.assert_close(grads[0], layer.A.grad, rtol=1e-6, atol=1e-7)  # p.grad is still there
        torch.testing.assert_close(grads[1], layer.B.grad, rtol=1e-6, atol=1e-7)
        momentum_rank = opt.capture.probes.pair(idx)[0].shape[1] - layer.rank  # (0 without momentum)
        assert batches[idx].left.shape[0] == batches[idx].right.shape[1] == momentum_rank


def test_a_factor_gradient_that_never_comes_stops_the_step():
    """A factor frozen after the optimizer was built: its gradient never comes, the products at (A, B) left to it are
    missing, and the step stops with a one-line error instead of stepping on them."""
    model = lora_two_layer_net(dtype=torch.float32, nonzero_B=False)
    opt = make("scaled", model, cache_free=True, distributor=PartitionedGradsDistributor())
    for i, (x, t) in enumerate(regression_batches(5, 2, 2 * B)):
        if i == 1:
            opt.layers[0].lora_A.weight.requires_grad_(False)
        F.mse_loss(model(x), t).backward()
        if i == 1:
            with pytest.raises(RuntimeError, match="did not come.*reuse_autograd_grads=False"):
                opt.step()
        else:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("name", ["scaled", "scaled-adafactor"])
def test_float64_cache_free_is_exact(name):
    _, rows, _ = one_process_run(name, cache_free=False, dtype=torch.float64)
    _, free, _ = one_process_run(name, cache_free=True, dtype=torch.float64)
    for layer, (A, B_) in rows.items():
        assert rel_err(free[layer][0], A) <= 1e-12 and rel_err(free[layer][1], B_) <= 1e-12


def test_a_method_with_the_old_sketch_hook_is_refused():
    """``needs_gradient_sketch`` became ``hook_statistics``: a method still overriding the old name would have it
    ignored, so it is refused at construction."""

    class OldHook(PreconditionedLoRA):
        def needs_gradient_sketch(self, group):
            return True

    with pytest.raises(TypeError, match="now hook_statistics"):
        OldHook(lora_two_layer_net(), 0.1)


def test_the_choice_and_the_refusals():
    net = lora_two_layer_net
    assert PreconditionedLoRA(net(), 0.1).cache_free  # default: on where the method allows it
    assert ScaledPSILoRA(net(), 1e-3, iters=0).cache_free
    assert not PSILoRA(net(), 0.1, iters=1).cache_free
    assert not ScaledPSILoRA(net(), 1e-3, iters=0, metric="shampoo").cache_free
    assert not PreconditionedLoRA(net(), 0.1, cache_free=False).cache_free
    assert isinstance(PreconditionedLoRA(net(), 0.1).capture, ProductCapture)
    with pytest.raises(ValueError, match="cache_free=True is not possible: iters=2"):
        PSILoRA(net(), 0.1, iters=2, cache_free=True)
    with pytest.raises(ValueError, match="metric='shampoo'"):
        ScaledPSILoRA(net(), 1e-3, iters=0, metric="shampoo", cache_free=True)
    with pytest.raises(ValueError, match="SVDLoRA needs the activation rows"):
        SVDLoRA(net(), 0.1, cache_free=True)
    # hyperparameters changed after construction to ones cache-free steps cannot take: an error, not a wrong step
    model = net()
    opt = PSILoRA(model, 0.1, iters=0)
    opt.lora_group["iters"] = 1
    model(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="this step cannot be cache-free: iters=1"):
        opt.step()


def test_one_process_exact_norm_falls_back_to_the_sketch_visibly(caplog):
    model = lora_two_layer_net()
    opt = PreconditionedLoRA(model, 0.1, max_grad_norm=1e-3)  # clip_norm_probes=0 asks for the exact norm
    with caplog.at_level(logging.WARNING, logger="psilora_ds"):
        for _ in range(2):
            model(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
            opt.step()
            opt.zero_grad()
    lines = [r.message for r in caplog.records if "16-probe random-sign sketch" in r.message]
    assert len(lines) == 1 and "cache_free=False" in lines[0]


def test_factors_changed_outside_are_an_error_until_refreshed():
    model = lora_two_layer_net()
    opt = PSILoRA(model, 0.1, momentum=0.9, iters=0)
    x = torch.randn(4, 12, dtype=torch.float64)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        opt.layers[0].A.mul_(1.5)  # e.g. an adapter loaded into the model
    model(x).sum().backward()
    with pytest.raises(StaleFactorsError, match="refresh_factors"):
        opt.step()
    opt.zero_grad()
    opt.refresh_factors()
    model(x).sum().backward()
    opt.step()  # products taken at the new factors: accepted


def test_load_state_dict_resumes_exactly():
    """Save after 2 steps, load into a fresh optimizer over the restored model: the next steps equal the
    uninterrupted run's (the momentum factors and the factors are re-read at load)."""
    data = regression_batches(9, 5, 8)

    def run(resume_at=None):
        model = lora_two_layer_net(dtype=torch.float32, head_trainable=True)
        opt = make("scaled", model)
        for i, (x, t) in enumerate(data):
            if i == resume_at:
                saved_model, saved_opt = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
                model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, seed=1)
                opt = make("scaled", model)
                model.load_state_dict(saved_model)
                opt.load_state_dict(saved_opt)
            F.mse_loss(model(x), t).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for layer in opt.layers for p in (layer.A, layer.B)]

    for a, b in zip(run(), run(resume_at=2)):
        assert rel_err(b, a) <= 1e-6


# ---- 2 ranks: DDP, DeepSpeed ZeRO 2 and 3, FSDP2, each cached vs cache-free -----------------------
ENGINES = ("ddp", "zero2", "zero3", "zero3-init", "fsdp2")  # zero3-init: model partitioned from birth
ENGINE_DATA_SEED, FIRST_STEP_ITERS = 17, 3


def engine_worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel

    import psilora_ds.distributed.deepspeed as psd
    from psilora_ds.distributed import DDPDistributor

    import deepspeed

    from .test_deepspeed import ds_config, full_factors

    data = regression_batches(ENGINE_DATA_SEED, STEPS * ACC, 2 * B)
    for engine_name in ENGINES:
        for name in NAMES:
            for cache_free in (False, True, "first"):  # "first": cache-free with the (sketched) spectral first step
                if engine_name == "zero3-init":  # base and LoRA factors partitioned from birth (shape [0] outside forward)
                    with deepspeed.zero.Init(config_dict_or_path=ds_config(3, micro_batch=B, clip=CLIP, gas=ACC)):
                        model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
                    assert model.base_model.model.fc1.lora_A["default"].weight.numel() == 0
                    if cache_free == "first" and name == NAMES[0]:  # (drawn partitioned: not one process's init)
                        with deepspeed.zero.GatheredParameters(list(model.parameters())):
                            init = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        if rank == 0:
                            torch.save(init, out / "zero3-init-weights.pt")
                else:
                    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
                kw = dict(cache_free=bool(cache_free), accumulation_steps=ACC)
                if cache_free == "first":
                    kw["first_step_iters"] = FIRST_STEP_ITERS
                if engine_name == "ddp":
                    opt = make(name, model, max_grad_norm=CLIP, distributor=DDPDistributor(shard_state=True), **kw)
                    forward = DistributedDataParallel(model)
                elif engine_name == "fsdp2":
                    fsdp2_sharded(model, "fc1", "fc2")
                    opt = make(name, model, max_grad_norm=CLIP, **kw)
                    forward = model
                else:
                    opt = make(name, model, **kw)
                    cfg = ds_config(int(engine_name[4]), micro_batch=B, clip=CLIP, gas=ACC)
                    forward, _, _, _ = psd.initialize(model=model, optimizer=opt, config=cfg)
                started = []  # cache-free: the products' buckets started by the end of each step's backward pass
                reduction = opt.capture.reduction if opt.cache_free else None
                for i, (x, t) in enumerate(data):
                    rows = slice(rank * B, (rank + 1) * B)
                    loss = F.mse_loss(forward(x[rows]), t[rows])
                    if engine_name.startswith("zero"):
                        forward.backward(loss)
                        if reduction is not None and i % ACC == ACC - 1:
                            started.append(reduction.started_buckets)
                        forward.step()
                    else:
                        (loss / ACC).backward()
                        if i % ACC == ACC - 1:
                            if reduction is not None:
                                started.append(reduction.started_buckets)
                            opt.step()
                            opt.zero_grad()
                assert opt.steps_taken == STEPS, (engine_name, name, cache_free, opt.steps_taken, opt.skipped_steps)
                if engine_name.startswith("zero"):
                    factors = full_factors(opt)
                    opt.distributor.close()
                elif engine_name == "fsdp2":
                    factors = {layer.name: (layer.A.full_tensor().detach().clone(), layer.B.full_tensor().detach().clone())
                               for layer in opt.layers}
                else:
                    factors = {layer.name: (layer.A.detach().clone(), layer.B.detach().clone()) for layer in opt.layers}
                torch.save({"factors": factors, "cache": opt.last_cache_bytes, "cache_free": opt.cache_free,
                            "norm": opt.last_grad_norm, "started": started,
                            "reuse": opt.planner.autograd.state,
                            "buckets": None if reduction is None else len(reduction.buckets)},
                           out / f"{engine_name}-{name}-{cache_free}-rank{rank}.pt")
                opt.remove_hooks()


    # collectives per step against the number of LoRA layers (DDP, replicated state, clipping)
    from peft import LoraConfig, get_peft_model

    from .models import TwoLayerNet

    counts = {}
    for targets, cache_free, shard in [(t, c, s) for t in (["fc1"], ["fc1", "fc2"]) for c in (False, True)
                                       for s in (False, True)]:
        torch.manual_seed(0)
        model = get_peft_model(TwoLayerNet(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        opt = make("scaled", model, max_grad_norm=CLIP, distributor=DDPDistributor(shard_state=shard),
                   cache_free=cache_free)
        forward = DistributedDataParallel(model)
        for x, t in data[:2]:
            opt.distributor.comm_calls = dict.fromkeys(opt.distributor.comm_calls, 0)  # count the last step, backward too
            F.mse_loss(forward(x[rank * B:(rank + 1) * B]), t[rank * B:(rank + 1) * B]).backward()
            opt.step()
            opt.zero_grad()
        counts[(len(targets), cache_free, shard)] = sum(opt.distributor.comm_calls.values())
        # the last step's broadcast bytes, and what the layers' metric diagonals and momentum factors weigh
        counts[("broadcast", len(targets), cache_free, shard)] = (
            opt.distributor.comm_bytes["broadcast"],
            sum((layer.in_features + layer.out_features) * 4 for layer in opt.layers),
            sum(round(layer.rank * opt.lora_group["rank_multiplier"]) * (layer.in_features + layer.out_features) * 4
                for layer in opt.layers), opt.state_nbytes())
        owned = [layer for layer in opt.layers if opt.distributor.owns(layer)]
        counts[("owned", len(targets), cache_free, shard)] = (
            sum((layer.in_features + layer.out_features) * 4 for layer in owned),
            sum(round(layer.rank * opt.lora_group["rank_multiplier"]) * (layer.in_features + layer.out_features) * 4
                for layer in owned), opt.factors.momentum_nbytes)
        opt.remove_hooks()
    torch.save(counts, out / f"calls-rank{rank}.pt")

    # factors changed behind the optimizer's back on rank 1 only: every rank refuses the step (rank 0 alone
    # stepping would leave the ranks with different factors; a rank raising alone could leave the other waiting)
    model = lora_two_layer_net(dtype=torch.float32)
    opt = make("scaled", model, cache_free=True, distributor=DDPDistributor())
    forward = DistributedDataParallel(model)
    x, t = data[0]
    outcomes = []
    for changed in (False, True):
        if changed and rank == 1:
            with torch.no_grad():
                opt.layers[0].A.mul_(1.5)
        F.mse_loss(forward(x[rank * B:(rank + 1) * B]), t[rank * B:(rank + 1) * B]).backward()
        try:
            opt.step()
            outcomes.append("stepped")
        except StaleFactorsError as err:
            outcomes.append(str(err))
        opt.zero_grad()
    torch.save(outcomes, out / f"stale-rank{rank}.pt")

    # more micro-batches per step than the optimizer was told (accumulation_steps 1, 2 taken): the buckets started on
    # the first micro-batch miss the second; every rank drops those sums and sums the products at the step, logged
    late = {}
    for bucket_bytes in (None, 4 * 2**20):
        torch.manual_seed(0)
        model = lora_two_layer_net(dtype=torch.float32)
        opt = make("scaled", model, cache_free=True, distributor=DDPDistributor(), max_grad_norm=CLIP,
                   accumulation_steps=1, overlap_bucket_bytes=bucket_bytes)
        forward = DistributedDataParallel(model)
        for x, t in data[:4]:
            F.mse_loss(forward(x[rank * B:(rank + 1) * B]), t[rank * B:(rank + 1) * B]).div(2).backward()
            if opt.capture.pending_microbatches == 2:
                opt.step()
                opt.zero_grad()
        late[bucket_bytes] = ([p.detach().clone() for layer in opt.layers for p in (layer.A, layer.B)],
                              opt.planner.logged_late, opt.steps_taken)
        opt.remove_hooks()
    torch.save(late, out / f"late-rank{rank}.pt")

    # data parallel without DDP's gradient averaging (each rank's LoRA gradients its own): the first step's check finds
    # them unequal to the products summed over ranks, and the steps keep taking those products; the same factors as
    # under DDP
    unreduced = {}
    for wrapped, cache_free in [(w, c) for w in (True, False) for c in (True, False)]:
        torch.manual_seed(0)
        model = lora_two_layer_net(dtype=torch.float32, head_trainable=False)  # (only LoRA factors: no DDP needed)
        opt = make("scaled", model, cache_free=cache_free, distributor=DDPDistributor(), max_grad_norm=CLIP)
        forward = DistributedDataParallel(model) if wrapped else model
        for x, t in data[:3]:
            F.mse_loss(forward(x[rank * B:(rank + 1) * B]), t[rank * B:(rank + 1) * B]).backward()
            opt.step()
            opt.zero_grad()
        unreduced[(wrapped, cache_free)] = ([p.detach().clone() for layer in opt.layers for p in (layer.A, layer.B)],
                                            opt.planner.autograd.state, opt.steps_taken)
        opt.remove_hooks()
    # accumulation under DDP's no_sync (the gradients reduced once, at the step's last micro-batch): the reuse holds
    for cache_free in (True, False):
        for sync_each in (True, False):
            torch.manual_seed(0)
            model = lora_two_layer_net(dtype=torch.float32, head_trainable=False)
            opt = make("scaled", model, cache_free=cache_free, distributor=DDPDistributor(), max_grad_norm=CLIP,
                       accumulation_steps=2)
            forward = DistributedDataParallel(model)
            for i, (x, t) in enumerate(data[:6]):
                rows = slice(rank * B, (rank + 1) * B)
                if i % 2 == 0 and not sync_each:
                    with forward.no_sync():
                        (F.mse_loss(forward(x[rows]), t[rows]) / 2).backward()
                else:
                    (F.mse_loss(forward(x[rows]), t[rows]) / 2).backward()
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
            unreduced[("no_sync" if not sync_each else "sync", cache_free)] = (
                [p.detach().clone() for layer in opt.layers for p in (layer.A, layer.B)], opt.planner.autograd.state,
                opt.steps_taken)
            opt.remove_hooks()
    torch.save(unreduced, out / f"unreduced-rank{rank}.pt")


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    _build_deepspeed_ops()  # once, here, before the ranks race to JIT-compile it
    out = tmp_path_factory.mktemp("cache_free")
    run_distributed(engine_worker, 2, out)
    return out


def _build_deepspeed_ops():
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_cache_free_equals_the_cached_rows(engine_runs, engine, name):
    """Same factors on every rank (2e-6, fp32: 1.08e-6 measured for Scaled PSI-LoRA at its default metric power 1 under
    DDP, whose inverse metric doubles the relative rounding of power 1/2's; exact in float64 in one process) after 4
    steps of 3 accumulated micro-batches with clipping, cache-free against the cached rows; the cache-free runs held
    no rows."""
    for rank in range(2):
        rows = torch.load(engine_runs / f"{engine}-{name}-False-rank{rank}.pt")
        free = torch.load(engine_runs / f"{engine}-{name}-True-rank{rank}.pt")
        assert free["cache_free"] and not rows["cache_free"]
        assert free["cache"] == 0 and rows["cache"] > 0
        assert free["norm"] == pytest.approx(rows["norm"], rel=1e-6) and free["norm"] > CLIP
        # every step's products were summed in buckets started during its backward pass (two layers: one bucket)
        assert free["buckets"] == 1 and free["started"] == [1] * STEPS
        # DDP leaves whole averaged LoRA gradients: after the first step they stand for the products at (A, B), on
        # rows as in the hooks; under ZeRO the cache-free hooks sum each micro-batch's as the backward pass computes
        # them (hooks on the factors: DeepSpeed partitions p.grad), the rows' steps compute the products; FSDP2's
        # factors are shards, whose gradients arrive reduce-scattered: products computed
        assert rows["reuse"] == ("on" if engine == "ddp" else "off")
        assert free["reuse"] == ("off" if engine == "fsdp2" else "on")
        for layer, (A, B_) in rows["factors"].items():
            assert rel_err(free["factors"][layer][0], A) <= 2e-6
            assert rel_err(free["factors"][layer][1], B_) <= 2e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_sketched_first_step_equals_one_process(engine_runs, engine, name):
    """The spectral first step from the sketch the hooks took (summed over ranks in the products' flat all-reduce),
    then 3 ordinary steps: every engine's factors equal one process's on the whole batch (3e-5, fp32: the products
    summed in another order, amplified by the conditioning of the sketch's least-squares reconstruction; 1.2e-5 to
    1.7e-5 read since the clipping probes became random signs, under 1e-5 before), and no step held rows. zero3-init
    draws its weights partitioned (not as one process does): one process starts from them."""
    weights = torch.load(engine_runs / "zero3-init-weights.pt") if engine == "zero3-init" else None
    opt, want, cache = one_process_run(name, True, seed=ENGINE_DATA_SEED, first_step_iters=FIRST_STEP_ITERS,
                                       weights=weights)
    assert opt.spectral_done and cache == [0] * STEPS
    for rank in range(2):
        got = torch.load(engine_runs / f"{engine}-{name}-first-rank{rank}.pt")
        assert got["cache_free"] and got["cache"] == 0
        assert got["norm"] == pytest.approx(opt.last_grad_norm, rel=1e-5)
        for layer, (A, B_) in want.items():
            assert rel_err(got["factors"][layer][0], A) <= 3e-5
            assert rel_err(got["factors"][layer][1], B_) <= 3e-5


@pytest.mark.slow
def test_stale_factors_on_one_rank_stop_every_rank(engine_runs):
    first0, then0 = torch.load(engine_runs / "stale-rank0.pt")
    first1, then1 = torch.load(engine_runs / "stale-rank1.pt")
    assert first0 == first1 == "stepped"
    assert "another rank" in then0 and "refresh_factors" in then0
    assert "fc1" in then1 and "refresh_factors" in then1


@pytest.mark.slow
def test_a_late_micro_batch_makes_every_rank_sum_at_the_step(engine_runs):
    """Two micro-batches per step where the optimizer expects one: the buckets started in the first one's backward
    pass are dropped on every rank, the step sums the products itself (logged once), and the factors equal those of
    a run that sums them at the step by design (overlap_bucket_bytes=None), bit for bit."""
    for rank in range(2):
        late = torch.load(engine_runs / f"late-rank{rank}.pt")
        at_step, bucketed = late[None], late[4 * 2**20]
        assert at_step[2] == bucketed[2] == 2
        assert bucketed[1] and not at_step[1]
        for a, b in zip(at_step[0], bucketed[0], strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_gradients_ddp_did_not_average_do_not_stand_for_the_products(engine_runs):
    """A DDPDistributor over a model DDP does not wrap: each rank's A.grad is its own, so the first step's check turns
    the reuse off on every rank (one warning) and the factors equal the DDP-wrapped run's, which reuses them; cache-free
    and on rows. Accumulating under DDP's no_sync (gradients reduced at the last micro-batch only) reuses them alike."""
    for rank in range(2):
        runs = torch.load(engine_runs / f"unreduced-rank{rank}.pt")
        for cache_free in (True, False):  # (the products from the hooks, or from the rows)
            (ddp, ddp_reuse, ddp_steps), (plain, plain_reuse, plain_steps) = runs[True, cache_free], runs[False, cache_free]
            assert ddp_reuse == "on" and plain_reuse == "off" and ddp_steps == plain_steps == 3
            for a, b in zip(ddp, plain, strict=True):
                assert rel_err(a, b) <= 2e-6
            # 2 micro-batches per step, the first under DDP's no_sync: the same as reducing both
            (synced, s_reuse, _), (deferred, d_reuse, d_steps) = runs["sync", cache_free], runs["no_sync", cache_free]
            assert s_reuse == d_reuse == "on" and d_steps == 3
            for a, b in zip(synced, deferred, strict=True):
                assert rel_err(a, b) <= 2e-6


@pytest.mark.slow
def test_cache_free_collectives_do_not_grow_with_the_layers(engine_runs):
    """Optimizer collectives in one step (DDP, clipping) do not grow with the layers (1 or 2 LoRA layers): cache-free,
    one flag vector and one bucket of every layer's products (two small layers: one bucket, started in the backward
    pass of the step's last micro-batch); the cached rows, one per round of the lockstep
    step; with layer-sharded state, plus one broadcast per owner rank."""
    counts = torch.load(engine_runs / "calls-rank0.pt")
    assert counts[(1, True, False)] == counts[(2, True, False)] == 2
    # the cached rows: all layers in lockstep (ops/rounds.py), one collective per round whatever the layers: flags,
    # norm sketch, K-FAC sums and the momentum's two half-steps (the step's two are DDP's averaged A.grad and B.grad,
    # once the first step has checked them)
    assert counts[(1, False, False)] == counts[(2, False, False)] == 5
    # layer-sharded state: plus one broadcast per owner rank (2 ranks), however many layers it owns
    assert counts[(1, True, True)] <= counts[(2, True, True)] <= 2 + 2
    assert counts[(1, False, True)] <= counts[(2, False, True)] <= 5 + 2



@pytest.mark.slow
def test_sharded_steps_do_not_broadcast_the_momentum(engine_runs):
    """Layer-sharded state: every rank computes every layer's update, so every rank holds the momentum factors it
    computed (cache-free: the capture's copy, for the products at them; on rows: a copy kept for that), and the owners
    broadcast only the metric diagonals; the copies count in the state's bytes."""
    counts = torch.load(engine_runs / "calls-rank0.pt")
    for cache_free in (True, False):
        sent, metrics, momentum, state_bytes = counts[("broadcast", 2, cache_free, True)]
        assert sent == metrics, cache_free  # the 2 layers' metric_in + metric_out, fp32, from their owners
        owned_metrics, owned_momentum, copies = counts[("owned", 2, cache_free, True)]
        # the state: the owned layers' only; the other layers' momentum copies apart (cache-free: the capture's)
        assert state_bytes == owned_metrics + owned_momentum and owned_metrics > 0
        assert copies == (0 if cache_free else momentum - owned_momentum)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_model_moved_after_the_optimizer_steps_as_one_built_there():
    """``opt = PreconditionedLoRA(model); model.cuda()`` (legal with torch's optimizers): the cache-free products are
    taken on the model's new device (the H200 run of bench/step_overhead.py crashed with CPU probe factors)."""
    x = torch.randn(4, 12, dtype=torch.float64)
    moved, there = lora_two_layer_net(), lora_two_layer_net().cuda()
    opts = [PreconditionedLoRA(moved, 0.1), PreconditionedLoRA(there, 0.1)]
    moved.cuda()
    for model, opt in zip((moved, there), opts):
        model(x.cuda()).sum().backward()
        opt.step()
    for a, b in zip(moved.parameters(), there.parameters()):
        assert torch.allclose(a, b)


def test_half_precision_factors_keep_their_products_in_the_hooks(caplog):
    """bf16 LoRA factors have bf16 gradients: the reuse is off from the start (no check, no warning) and the steps'
    hooks keep taking the products at (A, B) in fp32."""
    model = lora_two_layer_net(dtype=torch.float32, nonzero_B=False).to(torch.bfloat16)  # (peft's adapters: fp32)
    with caplog.at_level(logging.INFO, logger="psilora_ds.optim.autograd_grads"):
        opt = make("scaled", model, cache_free=True)
        for x, t in regression_batches(5, 2, 2 * B):
            F.mse_loss(model(x.bfloat16()), t.bfloat16()).backward()
            opt.step()
            opt.zero_grad()
    assert opt.capture.autograd_reuse == "off" and opt.steps_taken == 2 and not caplog.text
