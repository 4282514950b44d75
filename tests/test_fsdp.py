"""PSI-LoRA under torch FSDP2 (fully_shard, 2 CPU ranks, gloo): exact data parallelism against one
process with the double batch, LoRA factors written back into their DTensor shards, sharded state."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from psilora_ds.distributed import DDPDistributor, FSDP2Distributor
from psilora_ds.distributed.fsdp import load_checkpoint, save_checkpoint

from .distributed import (OPTIMIZERS, assert_ranks_match, assert_state_split, count_factor_reads, fsdp2_sharded,
                          make_optimizer, one_process_reference, regression_batches, rel_err, run_distributed)
from .models import lora_two_layer_net

pytestmark = pytest.mark.slow
STEPS, B = 5, 8


def batches():
    return regression_batches(31, STEPS, 2 * B)


def full_factors(opt):
    return {layer.name: (layer.A.full_tensor().clone(), layer.B.full_tensor().clone()) for layer in opt.layers}


def sharded_net():
    return fsdp2_sharded(lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False), "fc1", "fc2")


def worker(rank, world, out):
    # the distributor follows the factors: FSDP2 by default, a distributor that cannot read DTensors refused
    assert isinstance(make_optimizer("psilora", sharded_net()).distributor, FSDP2Distributor)
    with pytest.raises(ValueError, match="the LoRA factors are DTensors"):
        make_optimizer("psilora", sharded_net(), distributor=DDPDistributor())
    for name in OPTIMIZERS:
        model = sharded_net()
        opt = make_optimizer(name, model, distributor=FSDP2Distributor())
        assert isinstance(opt.layers[0].A, DTensor)
        for x, t in batches():
            rows = slice(rank * B, (rank + 1) * B)
            F.mse_loss(model(x[rows]), t[rows]).backward()
            opt.step()
            opt.zero_grad()
        factors = full_factors(opt)
        torch.save({"factors": factors, "state_bytes": opt.state_nbytes()}, out / f"{name}-rank{rank}.pt")
        opt.remove_hooks()
    # checkpoint after 3 steps, then 2 more steps
    model = sharded_net()
    opt = make_optimizer("scaled", model, distributor=FSDP2Distributor())
    for step, (x, t) in enumerate(batches()):
        if step == 3:
            save_checkpoint(str(out / "dcp"), model, opt)
        rows = slice(rank * B, (rank + 1) * B)
        F.mse_loss(model(x[rows]), t[rows]).backward()
        opt.step()
        opt.zero_grad()
    factors = full_factors(opt)
    torch.save(factors, out / f"ckpt-final-rank{rank}.pt")
    # cached steps start from the optimizer's factor copy (no gathers); a factor changed behind the optimizer on
    # one rank's shard only is read again by every rank: the same run as one that gathers every step
    # "odd": rank 1 alone finds its shards cut unlike distribute_tensor: every rank agrees to read whole (no rank
    # is left waiting in a collective the other skipped), and the run equals the gathered one
    import psilora_ds.distributed.fsdp as fsdp_module

    runs = {}
    for copy in (True, False, "odd"):
        model = sharded_net()
        cut = fsdp_module._cut_like_distribute_tensor
        if copy == "odd" and rank == 1:
            fsdp_module._cut_like_distribute_tensor = lambda param: False
        opt = make_optimizer("scaled", model, distributor=FSDP2Distributor())
        fsdp_module._cut_like_distribute_tensor = cut
        reads = count_factor_reads(opt, copy=copy is not False)
        for step, (x, t) in enumerate(batches()):
            if step == 3 and rank == 0:
                with torch.no_grad():
                    opt.layers[1].B.to_local().mul_(0.5)
            rows = slice(rank * B, (rank + 1) * B)
            F.mse_loss(model(x[rows]), t[rows]).backward()
            opt.step()
            opt.zero_grad()
        runs[copy] = (full_factors(opt), len(reads), opt.distributor.shards_cut_locally)
        opt.remove_hooks()
    torch.save(runs, out / f"copy-rank{rank}.pt")



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_distributed(worker, 2, out)
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_two_ranks_equal_one_process(runs, name):
    ranks = [torch.load(runs / f"{name}-rank{k}.pt") for k in range(2)]
    _, ref, total = one_process_reference(name, batches())
    assert_ranks_match([r["factors"] for r in ranks], ref)
    assert_state_split([r["state_bytes"] for r in ranks], total, sharded=True)


def test_cached_steps_start_from_the_factor_copy_and_reread_changes(runs):
    for k in range(2):
        r = torch.load(runs / f"copy-rank{k}.pt")
        (with_copy, reads_copy, cut), (gathered, reads_gathered, _), (odd, reads_odd, odd_cut) = (
            r[True], r[False], r["odd"])
        assert reads_gathered == 2 * 5  # 2 layers, 5 steps: one gather per layer per step
        assert reads_copy == 1  # only the layer changed behind the optimizer (on rank 0 only), once
        assert cut and not odd_cut and reads_odd == 2 * 5  # both ranks agreed to read whole, every step
        for name, (A, B_) in gathered.items():
            assert torch.equal(with_copy[name][0], A) and torch.equal(with_copy[name][1], B_)
            assert torch.equal(odd[name][0], A) and torch.equal(odd[name][1], B_)


def test_dcp_checkpoint_reshards_to_one_process(runs):
    """Saved by 2 FSDP2 ranks (each its own layers' state), loaded by one plain process, which then
    continues exactly as the 2-rank run did."""
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = make_optimizer("scaled", model)
    load_checkpoint(str(runs / "dcp"), model, opt)
    assert all(opt.state[layer.A]["step"] == 3 for layer in opt.layers)
    for x, t in batches()[3:]:
        F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    expected = torch.load(runs / "ckpt-final-rank0.pt")
    for layer in opt.layers:
        assert rel_err(layer.A.detach(), expected[layer.name][0]) <= 1e-5
        assert rel_err(layer.B.detach(), expected[layer.name][1]) <= 1e-5


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model = lora_two_layer_net(dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "nope"), model, make_optimizer("scaled", model))
