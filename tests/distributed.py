"""Run a function on N CPU processes with the gloo backend (as DeepSpeed's own CI does)."""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment of a launched test process (python, deepspeed, torchrun): offline, one thread per
    process, the repository's DeepSpeed op cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)  # an exception exits non-zero: the spawner stops the other ranks
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter teardown: DeepSpeed engines destroyed there intermittently abort the
    # process ("terminate called without an active exception", SIGABRT) after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size, *args):
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; raises if any fails."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="spawn")


# ---- what the 2-rank tests share: the optimizers they compare, data, measures ---------------------
OPTIMIZERS = ("psilora", "scaled")


def make_optimizer(name, model, **kw):
    from psilora_ds import PSILoRA, ScaledPSILoRA

    # no cache budget: with fold=True these small layers' rows go to the dense store as soon as it is smaller
    kw.setdefault("cache_max_bytes", None)

    if name == "psilora":  # with momentum inertia (its weight from the replicated momentum); "scaled" without
        return PSILoRA(model, 0.2, momentum=0.9, iters=2, momentum_prox=0.3, **kw)
    # lr 1e-3 at the default K-FAC power 1: steps of the size lr 1e-2 took at power 1/2 (their unit is 10-100x apart)
    return ScaledPSILoRA(model, 1e-3, betas=(0.9, 0.99), iters=2, damping=1e-6, **kw)


def count_factor_reads(opt, *, copy: bool = True) -> list:
    """Count the optimizer's reads of the engine's factors (a collective each where they are sharded): the list
    returned grows by one per read. ``copy=False``: read them every step instead of starting from the optimizer's
    own factor copy."""
    if not copy:
        opt.distributor.reads_factors_collectively = lambda masters: False
        opt.refresh_factors()
    reads = []
    read = opt.distributor.read_factors
    opt.distributor.read_factors = lambda *a: reads.append(1) or read(*a)
    return reads


def fsdp2_sharded(model, *modules):
    """``model`` (a peft model) under FSDP2 as the tests lay it out: ``fully_shard`` on each named module of its base
    network, then on the whole model."""
    from torch.distributed.fsdp import fully_shard

    net = model.base_model.model
    for name in modules:
        fully_shard(getattr(net, name))
    fully_shard(model)
    return model


def regression_batches(seed, steps, rows):
    """``steps`` batches of ``rows`` inputs (12 features) and targets (3) for the two-layer test net."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 12, generator=g), torch.randn(rows, 3, generator=g)) for _ in range(steps)]


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def one_process_reference(name, data):
    """The reference of every 2-rank test: one plain process on the whole (double) batches.
    Returns ``(optimizer, {layer name: (A, B)}, state bytes)``."""
    import torch.nn.functional as F

    from .models import lora_two_layer_net

    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = make_optimizer(name, model)
    for x, t in data:
        F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    factors = {layer.name: (layer.A.detach(), layer.B.detach()) for layer in opt.layers}
    return opt, factors, opt.state_nbytes()


def assert_ranks_match(ranks, reference, tol=1e-5):
    """Every rank's factors (``ranks[k][layer] = (A, B)``) equal the reference's (``{layer: (A, B)}``)."""
    for layer, (A, B) in reference.items():
        for factors in ranks:
            assert rel_err(factors[layer][0], A) <= tol
            assert rel_err(factors[layer][1], B) <= tol


def assert_state_split(per_rank, total, sharded):
    """Layer-sharded state: the ranks' bytes add up to the one-process total, each about half; else
    every rank holds it all."""
    if sharded:
        assert sum(per_rank) == total and max(per_rank) <= 0.75 * total, (per_rank, total)
    else:
        assert all(b == total for b in per_rank), (per_rank, total)
