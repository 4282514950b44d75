"""fp16 dynamic loss scaling, tested on CPU where DeepSpeed refuses fp16: the DeepSpeed distributor
driven by a stand-in exposing the engine attributes it reads (scale divided out of Z; an injected
inf skips the step on all ranks with factors and state unchanged; captures of a step the engine
skipped are dropped)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from psilora_ds import ScaledPSILoRA
from psilora_ds.distributed.deepspeed import DeepSpeedDistributor

from .distributed import run_distributed
from .models import lora_two_layer_net

pytestmark = pytest.mark.slow
B = 8


class FP16EngineStandIn:
    """The engine attributes DeepSpeedDistributor reads, with a settable loss scale."""

    def __init__(self, module, scale):
        self.module = module
        self.global_steps = 0
        self.data_parallel_group = None
        self.optimizer = type("ScaledOpt", (), {"loss_scale": scale})()

    def zero_optimization_stage(self):
        return 2

    def fp16_enabled(self):
        return True


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(2 * B, 12, generator=g), torch.randn(2 * B, 3, generator=g)


def run(rank, scale, *, inf_at=None, engine_skip_at=None, steps=4):
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=False, nonzero_B=True)
    opt = ScaledPSILoRA(model, 1e-2, iters=2)
    engine = FP16EngineStandIn(model, scale)
    opt.attach(DeepSpeedDistributor(engine, on_skipped_step=opt.discard_step))
    snapshots = []
    for step in range(steps):
        x, t = data(step)
        rows = slice(rank * B, (rank + 1) * B)
        loss = F.mse_loss(model(x[rows]), t[rows]) * engine.optimizer.loss_scale
        if step == inf_at and rank == 0:
            loss = loss * float("inf")
        loss.backward()
        if step == engine_skip_at:
            engine.global_steps += 1  # the engine saw an overflow and did not call the optimizer
            for p in model.parameters():
                p.grad = None
            continue
        before = {layer.name: (layer.A.detach().clone(), layer.B.detach().clone()) for layer in opt.layers}
        state_before = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in st.items()}
                        for k, st in opt.state_dict()["layers"].items()}
        opt.step()
        for p in model.parameters():
            p.grad = None
        engine.global_steps += 1
        snapshots.append((before, state_before))
    factors = {layer.name: (layer.A.detach().clone(), layer.B.detach().clone()) for layer in opt.layers}
    return opt, factors, snapshots


def worker(rank, world, out):
    _, plain, _ = run(rank, 1.0)
    _, scaled, _ = run(rank, 1024.0)
    opt, _, snaps = run(rank, 1024.0, inf_at=1, steps=2)
    after_inf = {layer.name: (layer.A.detach().clone(), layer.B.detach().clone()) for layer in opt.layers}
    inf_result = {"skipped": opt.skipped_steps, "before": snaps[1][0], "after": after_inf,
                  "state_before": snaps[1][1], "state_after": opt.state_dict()["layers"]}
    opt2, skipped_run, _ = run(rank, 1.0, engine_skip_at=1, steps=3)
    torch.save({"plain": plain, "scaled": scaled, "inf": inf_result, "engine_skip": skipped_run,
                "dropped": opt2.distributor.dropped_captures, "world": dist.get_world_size()},
               out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    run_distributed(worker, 2, out)
    return [torch.load(out / f"rank{k}.pt") for k in range(2)]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_loss_scale_is_divided_out_of_Z(results):
    for r in results:
        for name, (A, B_) in r["plain"].items():
            assert rel_err(r["scaled"][name][0], A) < 1e-5
            assert rel_err(r["scaled"][name][1], B_) < 1e-5


def test_inf_on_one_rank_skips_the_step_on_all_ranks(results):
    for r in results:
        inf = r["inf"]
        assert inf["skipped"] == 1
        for name, (A, B_) in inf["before"].items():
            assert torch.equal(inf["after"][name][0], A) and torch.equal(inf["after"][name][1], B_)
        for name, st in inf["state_before"].items():
            for k, v in st.items():
                after = inf["state_after"][name][k]
                assert torch.equal(after, v) if isinstance(v, torch.Tensor) else after == v


def test_captures_of_a_step_the_engine_skipped_are_dropped(results):
    """Steps 0 and 2 taken, step 1 skipped by the engine: equals a run on the data of steps 0 and 2."""
    for rank, r in enumerate(results):
        assert r["dropped"] == 1
    # reference: the same two steps without the skipped one, computed in this process
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=False, nonzero_B=True)
    opt = ScaledPSILoRA(model, 1e-2, iters=2)
    for step in (0, 2):
        x, t = data(step)
        F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    for layer in opt.layers:
        for r in results:
            assert rel_err(r["engine_skip"][layer.name][0], layer.A.detach()) < 1e-5
            assert rel_err(r["engine_skip"][layer.name][1], layer.B.detach()) < 1e-5
