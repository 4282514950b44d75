"""PSI-LoRA under DeepSpeed ZeRO 0-3 on CPU (gloo, 2 processes): exact data parallelism against a
single process with the double batch, sharded state, bf16 training."""

import os

import pytest
import torch
import torch.nn.functional as F

from psilora_ds import PSILoRA, ScaledPSILoRA

from .distributed import run_distributed
from .models import lora_two_layer_net

pytestmark = pytest.mark.slow
STEPS, B = 5, 8
STAGES = (0, 1, 2, 3)
OPTIMIZERS = ("psilora", "scaled")


def batches(steps=STEPS):
    g = torch.Generator().manual_seed(21)
    return [(torch.randn(2 * B, 12, generator=g), torch.randn(2 * B, 3, generator=g)) for _ in range(steps)]


def make(name, model, **kw):
    if name == "psilora":
        return PSILoRA(model, 0.2, momentum=0.9, iters=2, **kw)
    return ScaledPSILoRA(model, 1e-2, betas=(0.9, 0.99), iters=2, damping=1e-6, **kw)


def ds_config(stage, *, micro_batch=B, world=2, dtype="fp32", clip=0.0, gas=1):
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro_batch * world * gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def full_factors(opt):
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for layer in opt.layers:
        A, B_ = safe_get_full_fp32_param(layer.A), safe_get_full_fp32_param(layer.B)
        if A is None:  # stage 0 fp32: the parameters are the masters
            A, B_ = layer.A.detach(), layer.B.detach()
        out[layer.name] = (A.clone().float(), B_.clone().float())
    return out


def exact_worker(rank, world, out):
    import psilora_ds.deepspeed as psd

    for stage in STAGES:
        for name in OPTIMIZERS:
            model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
            opt = make(name, model)
            engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(stage))
            for x, t in batches():
                rows = slice(rank * B, (rank + 1) * B)
                loss = F.mse_loss(engine(x[rows]), t[rows])
                engine.backward(loss)
                engine.step()
            torch.save({"factors": full_factors(opt), "state_bytes": state_bytes(opt)},
                       out / f"{name}-{stage}-rank{rank}.pt")
            opt.distributor.close()
            opt.remove_hooks()


def single_process(name):
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = make(name, model)
    for x, t in batches():
        F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    return {"factors": {k: v for k, v in ((layer.name, (layer.A.detach(), layer.B.detach())) for layer in opt.layers)},
            "state_bytes": state_bytes(opt)}


@pytest.fixture(scope="module")
def deepspeed_ops():
    """Build DeepSpeed's CPU communication op once, here, before ranks race to JIT-compile it."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, deepspeed_ops):
    out = tmp_path_factory.mktemp("ds")
    run_distributed(exact_worker, 2, out)
    return out


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_two_ranks_equal_one_process_with_double_batch(exact_runs, stage, name):
    ranks = [torch.load(exact_runs / f"{name}-{stage}-rank{k}.pt") for k in range(2)]
    ref = single_process(name)
    for layer, (A, B_) in ref["factors"].items():
        for r in ranks:
            assert rel_err(r["factors"][layer][0], A) <= 1e-5
            assert rel_err(r["factors"][layer][1], B_) <= 1e-5
    total = ref["state_bytes"]
    per_rank = [r["state_bytes"] for r in ranks]
    if stage == 0:
        assert per_rank == [total, total]
    else:  # layer-sharded: each rank about half
        assert sum(per_rank) == total and max(per_rank) <= 0.75 * total, (per_rank, total)
