"""The recipe's checkpoints move between world sizes exactly: a checkpoint saved by 2 data-parallel ranks
with layer-sharded optimizer state, loaded by 1 process (and 1 -> 2), takes the same next step as the
run that never stopped (2 ranks on b rows each equal 1 process on 2b rows, so both continuations are
comparable to the uninterrupted run). Also: the atomic publish / rotation and metrics leftovers."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from psilora_ds.distributed import DDPDistributor
from psilora_ds.recipe import checkpoint
from psilora_ds.recipe.checkpoint_files import write_manifest
from psilora_ds.recipe.engines import TrainableParams
from psilora_ds.recipe.runlog import MetricsLog, read_metrics

from .distributed import make_optimizer, regression_batches, run_distributed
from .models import lora_two_layer_net, polar_two_layer_net

SAVED_AT, B = 3, 8


def batches():
    return regression_batches(23, SAVED_AT + 2, 2 * B)


def setup(world, optim="scaled"):
    distributor = DDPDistributor(shard_state=True) if world > 1 else None
    kw = {"distributor": distributor} if distributor else {}
    if optim == "polar":
        from psilora_ds.optim import PoLAR

        model = polar_two_layer_net(dtype=torch.float32, head_trainable=True)
        opt = PoLAR(model, 1e-2, **kw)
    else:
        model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
        opt = make_optimizer(optim, model, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    params = TrainableParams(model, opt)
    params.engine_built(None)
    return model, opt, sched, params


def train(model, opt, sched, steps, rank, world):
    rows = slice(rank * 2 * B // world, (rank + 1) * 2 * B // world)
    for x, t in steps:
        F.mse_loss(model(x[rows]), t[rows]).backward()
        if world > 1:  # the DDP reducer's job, done by hand on this tiny model: average the head's grads
            for p in model.parameters():
                if p.grad is not None and p.requires_grad and "lora_" not in _name(model, p):
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        sched.step()
        opt.zero_grad()


def _name(model, p):
    return next(n for n, q in model.named_parameters() if q is p)


def factors(opt):
    """Every layer's factors as its method declares them ((A, B), or PoLAR's (A, S, B))."""
    return {layer.name: torch.cat([f.detach().flatten() for f in opt.layer_factors(layer)]) for layer in opt.layers}


def run_and_save(rank, world, root, resume_from=None, start=0, optim="scaled"):
    model, opt, sched, params = setup(world, optim)
    if resume_from is not None:
        checkpoint.load(resume_from, optim=optim, params=params, optimizer=opt, scheduler=sched,
                        device=torch.device("cpu"))
    data = batches()
    train(model, opt, sched, data[start:SAVED_AT], rank, world)
    if resume_from is None:
        trainer = checkpoint.TrainerState(step=SAVED_AT, world_size=world, optim=optim, engine="pytorch")
        checkpoint.save(str(root), trainer, params=params, optimizer=opt, scheduler=sched, partitioned=False, keep=2)
    train(model, opt, sched, data[SAVED_AT:], rank, world)
    if rank == 0:
        torch.save({"factors": factors(opt), "head": [p.detach().clone() for p in opt.other_optimizer.param_groups[0]
                                                      ["params"]], "state_bytes": opt.state_nbytes()},
                   os.path.join(root, f"final-{world}-{'resumed' if resume_from else 'straight'}.pt"))


def two_ranks(rank, world, root, resume_from, optim):
    run_and_save(rank, world, root, resume_from, start=SAVED_AT if resume_from else 0, optim=optim)


def assert_same_run(a, b):
    for name in a["factors"]:
        torch.testing.assert_close(b["factors"][name], a["factors"][name], rtol=1e-5, atol=1e-7)
    for pa, pb in zip(a["head"], b["head"]):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["scaled", "polar"])
def test_two_ranks_to_one_and_one_to_two_continue_exactly(tmp_path, optim):
    # 2 ranks (layer-sharded state) save at step 3 and go on; 1 process resumes from their checkpoint
    run_distributed(two_ranks, 2, tmp_path / "from2", None, optim)
    saved = tmp_path / "from2" / f"step-{SAVED_AT}"
    assert sorted(os.listdir(saved)) == ["rank-0.pt", "rank-1.pt", "state.pt", "trainer_state.json"]
    run_and_save(0, 1, tmp_path / "from2", resume_from=str(saved), start=SAVED_AT, optim=optim)
    straight2 = torch.load(tmp_path / "from2" / "final-2-straight.pt")
    resumed1 = torch.load(tmp_path / "from2" / "final-1-resumed.pt")
    assert_same_run(straight2, resumed1)
    # the sharded state was gathered: one process holds every layer's state
    assert resumed1["state_bytes"] > 0 and resumed1["state_bytes"] >= straight2["state_bytes"]

    # 1 process saves at step 3 and goes on; 2 ranks resume from its checkpoint
    run_and_save(0, 1, tmp_path / "from1", optim=optim)
    run_distributed(two_ranks, 2, tmp_path / "from1", str(tmp_path / "from1" / f"step-{SAVED_AT}"), optim)
    straight1 = torch.load(tmp_path / "from1" / "final-1-straight.pt")
    assert_same_run(straight1, torch.load(tmp_path / "from1" / "final-2-resumed.pt"))
    assert_same_run(straight1, straight2)  # and all four are the same run


def test_partitioned_state_on_another_world_size_is_one_line(tmp_path):
    path = tmp_path / "step-4"
    path.mkdir()
    write_manifest(str(path), {"step": 4, "world_size": 2, "optim": "adamw", "engine": "deepspeed-zero2",
                               "rank_specific": ["torch"]})
    model, opt, sched, params = setup(1)
    with pytest.raises(checkpoint.ConfigError, match="saved by 2 ranks .* resume it with 2"):
        checkpoint.load(str(path), optim="adamw", params=params, optimizer=opt, scheduler=sched,
                        device=torch.device("cpu"))
    with pytest.raises(checkpoint.ConfigError, match="resume it with --optim adamw"):
        checkpoint.load(str(path), optim="scaled", params=params, optimizer=opt, scheduler=sched,
                        device=torch.device("cpu"))


def test_publish_rotation_and_leftovers(tmp_path):
    """Only complete step-N directories count; rotation and interrupted saves leave nothing that looks complete."""
    model, opt, sched, params = setup(1)
    root = str(tmp_path / "ckpt")
    for step in (2, 4, 6):
        trainer = checkpoint.TrainerState(step=step, world_size=1, optim="scaled", engine="pytorch")
        checkpoint.save(root, trainer, params=params, optimizer=opt, scheduler=sched, partitioned=False, keep=2)
    assert [s for s, _ in checkpoint.checkpoint_dirs(root)] == [4, 6]
    # what kill -9 leaves: a partial save (no trainer_state.json) and a half-deleted rotation
    os.makedirs(os.path.join(root, ".step-8.partial"))
    os.makedirs(os.path.join(root, ".step-2.deleting"))
    os.makedirs(os.path.join(root, "step-10"))  # a directory without the marker is not a checkpoint
    assert checkpoint.resolve_resume("latest", root).endswith("step-6")
    checkpoint.remove_leftovers(root)
    assert sorted(os.listdir(root)) == ["step-10", "step-4", "step-6"]
    with pytest.raises(checkpoint.ConfigError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(os.path.join(root, "step-10"), root)
    with pytest.raises(checkpoint.ConfigError, match="holds no complete checkpoint"):
        checkpoint.resolve_resume("latest", str(tmp_path / "empty"))


def test_metrics_with_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    log = MetricsLog(str(path), enabled=True)
    log.truncate_after(1)
    log.write({"step": 2, "loss": 1.4})
    assert read_metrics(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.4}]
