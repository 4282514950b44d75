"""PoLAR under every engine: 2 ranks with micro-batch b each (DDP with replicated or layer-sharded state, DeepSpeed
ZeRO 0-3, FSDP2) equal 1 process with batch 2b (rel 1e-5, fp32), the core S included; cache-free (the default: the
products in the hooks, summed over ranks) and, under DDP and ZeRO-2/3, from the cached rows."""

import pytest
import torch
import torch.nn.functional as F

from .distributed import fsdp2_sharded, regression_batches, rel_err, run_distributed
from .models import polar_two_layer_net
from .test_deepspeed import ds_config

pytestmark = pytest.mark.slow
STEPS, B, LR = 5, 8, 1e-2
CASES = ["ddp", "ddp-sharded", "zero0", "zero1", "zero2", "zero3", "fsdp2", "ddp-rows", "zero2-rows", "zero3-rows"]


def batches():
    return regression_batches(31, STEPS, 2 * B)


def make(model, **kw):
    from psilora_ds.optim import PoLAR

    return PoLAR(model, LR, polar_lam=0.5, weight_decay=0.1, cache_max_bytes=None, **kw)


def full(opt, read):
    return {layer.name: tuple(read(p).detach().clone().float() for p in (layer.A, layer.S, layer.B))
            for layer in opt.layers}


def worker(rank, world, out):
    from deepspeed.utils import safe_get_full_fp32_param
    from torch.nn.parallel import DistributedDataParallel

    import psilora_ds.distributed.deepspeed as psd
    from psilora_ds.distributed import DDPDistributor, FSDP2Distributor

    rows = slice(rank * B, (rank + 1) * B)
    for case in CASES:
        model = polar_two_layer_net()
        keep_rows = {"cache_free": False} if case.endswith("-rows") else {}
        case_engine = case.removesuffix("-rows")
        if case_engine.startswith("ddp"):
            forward = DistributedDataParallel(model)
            opt = make(model, distributor=DDPDistributor(shard_state=case == "ddp-sharded"), **keep_rows)
            for x, t in batches():
                F.mse_loss(forward(x[rows]), t[rows]).backward()
                opt.step()
                opt.zero_grad()
            result = full(opt, lambda p: p)
        elif case_engine.startswith("zero"):
            opt = make(model, **keep_rows)
            engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(int(case_engine[-1])))
            for x, t in batches():
                engine.backward(F.mse_loss(engine(x[rows]), t[rows]))
                engine.step()
            result = full(opt, lambda p: q if (q := safe_get_full_fp32_param(p)) is not None else p)
            opt.distributor.close()
        else:
            fsdp2_sharded(model, "fc1", "fc2")
            opt = make(model, distributor=FSDP2Distributor())
            for x, t in batches():
                F.mse_loss(model(x[rows]), t[rows]).backward()
                opt.step()
                opt.zero_grad()
            result = full(opt, lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p)
        assert opt.cache_free != bool(keep_rows) and (opt.last_cache_bytes == 0) != bool(keep_rows), case
        torch.save(result, out / f"{case}-rank{rank}.pt")
        opt.remove_hooks()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("polar")
    run_distributed(worker, 2, out)
    return out


def reference():
    model = polar_two_layer_net()
    opt = make(model)
    for x, t in batches():
        F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    return full(opt, lambda p: p)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_with_double_batch(runs, case):
    ref = reference()
    for k in range(2):
        got = torch.load(runs / f"{case}-rank{k}.pt")
        for layer, factors in ref.items():
            for a, b in zip(got[layer], factors):
                assert rel_err(a, b) <= 1e-5, (case, layer)
    assert any(float(f[1].norm()) > 0 for f in ref.values())  # the core moved
