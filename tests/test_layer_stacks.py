"""Steps of layers of equal shapes taken as one stack (psilora_ds/optim/layer_stacks.py): the same factors
and state as one layer at a time, fewer update calls, each layer's state its own, and the same under 2 ranks."""

import pytest
import torch
import torch.nn.functional as F

from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA
from psilora_ds.ops.linalg import SPDSolve, solve_spd_batch
from psilora_ds.optim import PoLAR

from .distributed import fsdp2_sharded, rel_err, run_distributed
from .models import lora_stack_net, polar_stack_net

STEPS, ACC, B = 4, 2, 6
CLIP = 0.05  # below these steps' gradient norms: clipping is active


def make(name, model, **kw):
    if name == "polar":
        return PoLAR(model, 4e-3, **kw)
    if name == "psilora-rows":  # steps on the rows: products at the factors found during the step
        return PSILoRA(model, 0.2, momentum=0.9, iters=2, **kw)
    if name == "scaled-rows":
        return ScaledPSILoRA(model, 1e-2, betas=(0.9, 0.99), iters=1, damping=1e-6, **kw)
    if name == "preconditioned":
        return PreconditionedLoRA(model, 0.2, **kw)
    if name == "psilora":
        return PSILoRA(model, 0.2, momentum=0.9, iters=0, **kw)
    if name == "scaled-adafactor":
        return ScaledPSILoRA(model, 1e-2, betas=(0.9, 0.99), iters=0, damping=1e-6, metric="adafactor", **kw)
    return ScaledPSILoRA(model, 1e-2, betas=(0.9, 0.99), iters=0, damping=1e-6, **kw)


def batches(seed=5, n=STEPS * ACC, rows=B):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 16, generator=g), torch.randn(rows, 3, generator=g)) for _ in range(n)]


def counting_updates(opt):
    """Count the optimizer's update_layer calls (per step, into the returned list)."""
    calls = []
    update = opt.update_layer

    def counted(*args):
        calls.append(type(args[0]).__name__)
        return update(*args)

    opt.update_layer = counted
    return calls


def run(name, dtype=torch.float64, first_step=False, **kw):
    model = polar_stack_net(dtype=dtype) if name == "polar" else lora_stack_net(dtype=dtype)
    extra = {"first_step_iters": 3} if first_step else {}
    kw.setdefault("cache_free", not name.endswith("-rows"))
    opt = make(name, model, max_grad_norm=CLIP, accumulation_steps=ACC, **extra, **kw)
    calls = counting_updates(opt)
    per_step = []
    run.folded = []  # layers folded into dense stores, per step (steps on rows)
    for i, (x, t) in enumerate(batches()):
        (F.mse_loss(model(x.to(dtype)), t.to(dtype)) / ACC).backward()
        if i % ACC == ACC - 1:
            if not opt.cache_free:
                run.folded.append(opt.capture.folded_layers())
            opt.step()
            opt.zero_grad()
            per_step.append(list(calls))
            calls.clear()
    assert opt.steps_taken == STEPS and opt.cache_free == kw["cache_free"]
    factors = [p.detach().clone() for layer in opt.layers for p in (layer.A, layer.B)]
    states = [{k: v.clone() for k, v in opt.state[layer.A].items() if isinstance(v, torch.Tensor)}
              for layer in opt.layers]
    return opt, factors, states, per_step


@pytest.mark.parametrize("name", ["preconditioned", "psilora", "scaled", "psilora-rows", "scaled-rows",
                                  "scaled-rows-folded", "polar"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_stacked_steps_equal_steps_one_layer_at_a_time(name, dtype, tol):
    """4 steps of 2 micro-batches, clipping active: fc1-fc3 (16 x 16) step as one stack, fc4 (10 x 16) alone, and the
    factors and every state tensor equal those of steps taken one layer at a time (float64: to rounding; float32: to
    the rounding of batched matrix products, carried through 4 steps' forward passes: 7e-6 measured, on the K-FAC
    output statistics, 1e-6 on the factors). Cache-free steps, and steps on the rows: kept (PSI-LoRA iters 2, Scaled
    iters 1), or folded into a dense store for one layer of the stack and not the others (fc3, and fc4, under a
    budget of 10000 bytes in float64, 5000 in float32: checked by hand); PoLAR (cache-free: autograd's gradients after
    the first step, which takes the hooks' products)."""
    kw = {}
    if name == "scaled-rows-folded":
        name, kw = "scaled-rows", {"cache_max_bytes": 10000 if dtype == torch.float64 else 5000}
    _, stacked, stacked_states, stacked_calls = run(name, dtype, **kw)
    if kw:
        assert run.folded == [2] * STEPS  # (fc3 and fc4: the stack holds rows, rows and a dense store)
    _, single, single_states, single_calls = run(name, dtype, stack_layers=False, **kw)
    assert stacked_calls == [["LayerStack", "LoRALayer"]] * STEPS
    assert single_calls == [["LoRALayer"] * 4] * STEPS
    for a, b in zip(stacked, single):
        assert rel_err(a, b) <= tol
    # (PoLAR in float32: Adam's moments of the direction factors, whose small entries carry rounding: 6.6e-5 measured)
    state_tol = 1e-4 if name == "polar" and dtype == torch.float32 else tol
    for a, b in zip(stacked_states, single_states):
        assert a.keys() == b.keys() and all(rel_err(a[k], b[k]) <= state_tol for k in a)


@pytest.mark.parametrize("name", ["scaled-adafactor", "polar-rows"])
def test_methods_that_read_a_layers_own_step_one_layer_at_a_time(name):
    """The Adafactor metric seeds its probes by the layer's index; PoLAR on rows takes its products by factor, layer
    by layer: neither stacks."""
    if name == "polar-rows":
        model = polar_stack_net(dtype=torch.float32)
        opt = PoLAR(model, 4e-3, cache_free=False)
    else:
        model = lora_stack_net(dtype=torch.float32)
        opt = make(name, model)
    calls = counting_updates(opt)
    x, t = batches()[0]
    F.mse_loss(model(x), t).backward()
    opt.step()
    assert calls == ["LoRALayer"] * 4


def test_the_first_step_from_the_sketch_steps_one_layer_at_a_time_then_stacks():
    """The spectral first step reads each layer's own sketch: that step is per layer, the later ones stacked, and the
    run equals the unstacked one."""
    _, stacked, _, calls = run("scaled", first_step=True)
    _, single, _, _ = run("scaled", first_step=True, stack_layers=False)
    assert calls[0] == ["LoRALayer"] * 4 and calls[1:] == [["LayerStack", "LoRALayer"]] * (STEPS - 1)
    for a, b in zip(stacked, single):
        assert rel_err(a, b) <= 1e-12


def test_each_layers_state_is_its_own_tensor():
    """After stacked steps, each layer's state tensors own their storage (a view of the stack would keep, and
    checkpoint, the whole stack), and a saved state dict is no larger than the unstacked run's."""
    import io

    opt, _, _, _ = run("scaled")
    for layer in opt.layers:
        for v in opt.state[layer.A].values():
            if isinstance(v, torch.Tensor):
                assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
    single, _, _, _ = run("scaled", stack_layers=False)
    sizes = []
    for o in (opt, single):
        buffer = io.BytesIO()
        torch.save(o.state_dict(), buffer)
        sizes.append(buffer.tell())
    assert sizes[0] <= sizes[1] * 1.01


def test_a_stacked_update_that_overflows_is_not_applied():
    """An infinite lr on the third step: the update is not finite, so no layer's factors or state change (the stack's
    members as the layer stepping alone), and the run goes on."""
    def steps(overflow_at=None):
        model = lora_stack_net(dtype=torch.float64)
        opt = make("scaled", model, max_grad_norm=CLIP, cache_free=True)
        calls = counting_updates(opt)
        before = None
        for i, (x, t) in enumerate(batches()[:4]):
            if i == overflow_at:
                before = ([p.detach().clone() for layer in opt.layers for p in (layer.A, layer.B)],
                          [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[layer.A].items()}
                           for layer in opt.layers])
                opt.lora_group["lr"] = float("inf")
            F.mse_loss(model(x.double()), t.double()).backward()
            opt.step()
            opt.zero_grad()
            if i == overflow_at:
                opt.lora_group["lr"] = 1e-2
                after = ([p.detach() for layer in opt.layers for p in (layer.A, layer.B)],
                         [opt.state[layer.A] for layer in opt.layers])
                assert opt.skipped_steps == 1 and calls[-2:] == ["LayerStack", "LoRALayer"]
                assert all(torch.equal(a, b) for a, b in zip(after[0], before[0]))
                for a, b in zip(after[1], before[1]):
                    assert a.keys() == b.keys() and all(
                        torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k] for k in b)
        return opt, [p.detach() for layer in opt.layers for p in (layer.A, layer.B)]

    opt, _ = steps(overflow_at=2)
    assert opt.steps_taken == 3


def test_stacked_systems_solve_as_each_alone_and_a_failed_one_by_least_squares():
    """A stack of 3 SPD systems with a singular middle one, solved with 2 single systems: each answer equals its own
    solve; the singular one the minimum-norm least-squares answer."""
    g = torch.Generator().manual_seed(0)
    r, k = 4, 6

    def spd():
        M = torch.randn(r, r, generator=g, dtype=torch.float64)
        return M @ M.T + 0.1 * torch.eye(r, dtype=torch.float64)

    u = torch.tensor([[1.0], [1.0], [0.0], [2.0]], dtype=torch.float64)
    singular = u @ u.T  # rank 1, exactly: Cholesky meets a zero pivot
    G = torch.stack([spd(), singular, spd()])
    R_left = torch.randn(3, r, k, generator=g, dtype=torch.float64)
    R_right = torch.randn(3, k, r, generator=g, dtype=torch.float64)
    alone = [SPDSolve(spd(), torch.randn(r, k, generator=g, dtype=torch.float64)), None]
    alone[1] = SPDSolve(alone[0].G.clone(), torch.randn(k, r, generator=g, dtype=torch.float64), "right")
    for sync_free in (False, True):
        out = solve_spd_batch([SPDSolve(G, R_left, "left"), alone[0], SPDSolve(G, R_right, "right"), alone[1]],
                              sync_free=sync_free)
        for j in range(3):  # each matrix of the stack as solved on its own
            own_left, own_right = solve_spd_batch([SPDSolve(G[j], R_left[j], "left"),
                                                   SPDSolve(G[j], R_right[j], "right")], sync_free=sync_free)
            assert rel_err(out[0][j], own_left) <= 1e-12 and rel_err(out[2][j], own_right) <= 1e-12
            if not sync_free:  # (the host-read path: the minimum-norm least-squares answer where Cholesky failed)
                want_left = torch.linalg.lstsq(G[j], R_left[j], driver="gelsd").solution
                want_right = torch.linalg.lstsq(G[j], R_right[j].T, driver="gelsd").solution.T
                assert rel_err(out[0][j], want_left) <= 1e-9 and rel_err(out[2][j], want_right) <= 1e-9
        assert rel_err(out[1], torch.linalg.solve(alone[0].G, alone[0].R)) <= 1e-10
        assert rel_err(out[3], torch.linalg.solve(alone[1].G, alone[1].R.T).T) <= 1e-10


# ---- 2 ranks: DDP with sharded state, ZeRO-2, ZeRO-3, FSDP2 -----------------------------------------------------
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
# cache-free (products summed in the backward pass), on the rows (the stacks' products summed over ranks in the step's
# rounds), PoLAR (autograd's gradients under DDP, the hooks' products under ZeRO); the clipping norm by the same
# 32-probe sketch everywhere
NAMES_2_RANKS = ("scaled", "scaled-rows", "polar")


def engine_worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel

    import psilora_ds.distributed.deepspeed as psd

    from psilora_ds.distributed import DDPDistributor

    from .test_deepspeed import ds_config, full_factors

    data = batches(rows=2 * B)
    for engine, name in [(e, n) for e in ENGINES for n in NAMES_2_RANKS]:
        model = polar_stack_net(dtype=torch.float32) if name == "polar" else lora_stack_net(dtype=torch.float32)
        kw = dict(cache_free=not name.endswith("-rows"), accumulation_steps=ACC, clip_norm_probes=32)
        if engine == "ddp":
            opt = make(name, model, max_grad_norm=CLIP, distributor=DDPDistributor(shard_state=True), **kw)
            forward = DistributedDataParallel(model)
        elif engine == "fsdp2":
            fsdp2_sharded(model, "fc1", "fc2", "fc3", "fc4")
            opt = make(name, model, max_grad_norm=CLIP, **kw)
            forward = model
        else:
            opt = make(name, model, **kw)
            forward, _, _, _ = psd.initialize(model=model, optimizer=opt,
                                              config=ds_config(int(engine[4]), micro_batch=B, clip=CLIP, gas=ACC))
        calls = counting_updates(opt)
        for i, (x, t) in enumerate(data):
            rows = slice(rank * B, (rank + 1) * B)
            loss = F.mse_loss(forward(x[rows]), t[rows])
            if engine in ("ddp", "fsdp2"):
                (loss / ACC).backward()
                if i % ACC == ACC - 1:
                    opt.step()
                    opt.zero_grad()
            else:
                forward.backward(loss)
                forward.step()
        assert opt.steps_taken == STEPS, (engine, opt.skipped_steps)
        if engine == "ddp":
            factors = {layer.name: (layer.A.detach().clone(), layer.B.detach().clone()) for layer in opt.layers}
        elif engine == "fsdp2":
            factors = {layer.name: (layer.A.full_tensor().detach().clone(), layer.B.full_tensor().detach().clone())
                       for layer in opt.layers}
        else:
            factors = full_factors(opt)
            opt.distributor.close()
        torch.save({"factors": factors, "stacks": calls.count("LayerStack"), "reuse": opt.planner.autograd.state},
                   out / f"{engine}-{name}-rank{rank}.pt")
        opt.remove_hooks()


@pytest.mark.slow
def test_two_ranks_stacked_equal_one_process_one_layer_at_a_time(tmp_path):
    """Each engine's 2-rank stacked run (every rank steps every layer from the same summed products) equals one
    process stepping one layer at a time on the same 12 rows per micro-batch."""
    from .test_cache_free import _build_deepspeed_ops

    _build_deepspeed_ops()
    run_distributed(engine_worker, 2, tmp_path)
    for name in NAMES_2_RANKS:
        model = polar_stack_net(dtype=torch.float32) if name == "polar" else lora_stack_net(dtype=torch.float32)
        opt = make(name, model, max_grad_norm=CLIP, accumulation_steps=ACC, cache_free=not name.endswith("-rows"),
                   clip_norm_probes=32, stack_layers=False)
        for i, (x, t) in enumerate(batches(rows=2 * B)):
            # (each rank's mean over its B rows, averaged over the 2 ranks: the mean over all 2 B rows)
            (F.mse_loss(model(x), t) / ACC).backward()
            if i % ACC == ACC - 1:
                opt.step()
                opt.zero_grad()
        want = {layer.name: (layer.A.detach(), layer.B.detach()) for layer in opt.layers}
        for engine in ENGINES:
            for rank in range(2):
                got = torch.load(tmp_path / f"{engine}-{name}-rank{rank}.pt")
                assert got["stacks"] == STEPS, (engine, name)
                # autograd's gradients stand for the products at the factors (PoLAR: are its gradients) after the
                # first step's check: whole under DDP, summed by the cache-free hooks under ZeRO (its placeholders
                # between uses at stage 3); FSDP2's shards and the rows under ZeRO keep the products
                whole = engine == "ddp" or (engine.startswith("zero") and not name.endswith("-rows"))
                assert got["reuse"] == ("on" if whole else "off"), (engine, name, got["reuse"])
                for layer, (A, B_) in want.items():
                    assert rel_err(got["factors"][layer][0], A) <= 2e-5 and \
                        rel_err(got["factors"][layer][1], B_) <= 2e-5, (engine, name, rank, layer)
