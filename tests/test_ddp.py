"""Data-parallel PSI-LoRA under torch DDP: 2 processes with micro-batch b each equal 1 process with
batch 2b (thin products all-reduced, never activations); layer-sharded state halves per-rank bytes."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from psilora_ds import PSILoRA, ScaledPSILoRA
from psilora_ds.distributed import DDPDistributor, balanced_owners

from .distributed import (assert_ranks_match, assert_state_split, make_optimizer, one_process_reference,
                          regression_batches, rel_err, run_distributed)
from .models import lora_two_layer_net

pytestmark = pytest.mark.slow
STEPS, B = 5, 8


def batches():
    return regression_batches(11, STEPS, 2 * B)


def factors(opt):
    return {layer.name: (layer.A.detach().clone(), layer.B.detach().clone()) for layer in opt.layers}


# "partitioned": layer-sharded state without the momentum copies (momentum_copies=False: the owners broadcast it)
CASES = [(name, shard) for name in ("psilora", "scaled") for shard in (False, True, "partitioned")]
# B rows of these small layers fold into the dense store; "rows" cases keep the factored rows
ROW_CASES = [(name, "rows") for name in ("psilora", "scaled")]


def ddp_worker(rank, world, out):
    for name, shard_state in CASES + ROW_CASES:  # one spawn for all cases: process start-up dominates
        model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
        ddp = DistributedDataParallel(model)
        opt = make_optimizer(name, model, distributor=DDPDistributor(shard_state=bool(shard_state)),
                             fold=shard_state != "rows", momentum_copies=shard_state != "partitioned")
        for x, t in batches():
            rows = slice(rank * B, (rank + 1) * B)
            F.mse_loss(ddp(x[rows]), t[rows]).backward()
            opt.distributor.comm_bytes = dict.fromkeys(opt.distributor.comm_bytes, 0)  # count the last step
            opt.step()
            opt.zero_grad()
        result = {"factors": factors(opt), "state_bytes": opt.state_nbytes(), "head": [p.detach().clone() for p in
                  opt.other_optimizer.param_groups[0]["params"]], "comm": opt.distributor.comm_bytes}
        torch.save(result, out / f"{name}-{shard_state}-rank{rank}.pt")
        opt.remove_hooks()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_distributed(ddp_worker, 2, out)
    return out



@pytest.mark.parametrize("name,shard_state", CASES + ROW_CASES)
def test_two_ranks_equal_one_rank_with_double_batch(ddp_runs, name, shard_state):
    ranks = [torch.load(ddp_runs / f"{name}-{shard_state}-rank{k}.pt") for k in range(2)]
    ref_opt, ref_factors, total = one_process_reference(name, batches())
    assert_ranks_match([r["factors"] for r in ranks], ref_factors)
    for layer in ref_factors:  # identical on every rank, bit for bit
        assert torch.equal(ranks[0]["factors"][layer][0], ranks[1]["factors"][layer][0])
        assert torch.equal(ranks[0]["factors"][layer][1], ranks[1]["factors"][layer][1])
    for r in ranks:
        for p, q in zip(r["head"], ref_opt.other_optimizer.param_groups[0]["params"]):
            assert rel_err(p, q) <= 1e-5
    # sharded: True or "rows" (sharded as well)
    assert_state_split([r["state_bytes"] for r in ranks], total, sharded=bool(shard_state))


def test_balanced_owners():
    owners = balanced_owners([10, 9, 8, 7, 1, 1], 2)
    load = [sum(s for s, o in zip([10, 9, 8, 7, 1, 1], owners) if o == k) for k in range(2)]
    assert sorted(load) == [18, 18]


def shampoo_worker(rank, world):
    model = lora_two_layer_net(dtype=torch.float32)
    with pytest.raises(ValueError, match="kfac"):
        ScaledPSILoRA(model, 1e-3, metric="shampoo")
    assert isinstance(PSILoRA(model, 0.1).distributor, DDPDistributor)  # auto-detected
    assert dist.get_world_size() == 2


def test_unsupported_combinations_fail_at_construction():
    run_distributed(shampoo_worker, 2)


@pytest.mark.parametrize("name,shard_state", CASES)
def test_collective_bytes_per_step(ddp_runs, name, shard_state):
    """Optimizer traffic of one step = iters x the LoRA-gradient bytes for the step (less its first product, autograd's
    A.grad) and again, times the momentum's rank over r, for the momentum (PSI-LoRA's default rank r, Scaled PSI-LoRA's
    2 r), plus the metric vectors, the per-layer flags and, when state is sharded, the broadcast metric EMAs of the
    layers each rank does not own (not their momentum factors: every rank computed them at the last step and kept
    them)."""
    comm = torch.load(ddp_runs / f"{name}-{shard_state}-rank0.pt")["comm"]
    model = lora_two_layer_net(dtype=torch.float32)
    layers = PSILoRA(model, 0.1).layers
    iters, f32 = 2, 4
    lora_grad = sum((l.rank * l.in_features + l.out_features * l.rank) * f32 for l in layers)
    metrics = sum((l.in_features + l.out_features) * f32 for l in layers) if name == "scaled" else 0
    flags = (len(layers) + 1) * 8
    momentum = 2 if name == "scaled" else 1  # the momentum's rank over r (ScaledPSILoRA's default rank_multiplier)
    # LoRSum's first A-step takes B^T P from DDP's averaged A.grad (checked on the first step; this is a later one)
    a_grad = sum(l.rank * l.in_features * f32 for l in layers)
    expected_reduce = iters * lora_grad * (1 + momentum) - a_grad + metrics + flags
    assert comm["all_reduce"] == expected_reduce
    # the metric EMAs, every layer; and the momentum factors where the non-owners keep no copy of them
    state = momentum * lora_grad + metrics if shard_state == "partitioned" else metrics
    assert comm["broadcast"] == (state if shard_state else 0)
    print(f"\n{name} shard_state={shard_state}: all-reduce {comm['all_reduce']} B, broadcast {comm['broadcast']} B; "
          f"LoRA gradients {lora_grad} B (ratio {comm['all_reduce'] / lora_grad:.2f})")
