"""The recipe's plain PyTorch engine under DDP (2 ranks, gloo): gradient accumulation reduces once per step (the
forwards before a step's last micro-batch run under DDP's ``no_sync``) and trains exactly as one process with the
double batch, for PSI-LoRA and for LoRA-AdamW."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import regression_batches, rel_err, run_distributed
from .models import lora_two_layer_net

pytestmark = pytest.mark.slow
STEPS, ACC, B = 3, 3, 4  # optimizer steps, micro-batches per step, rows per micro-batch and rank


class Regression(nn.Module):
    """The engine's calling convention (keyword batches) over a LoRA model: the output is the MSE loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return F.mse_loss(self.model(x), t)


def train(name, rank, world):
    from psilora_ds.recipe.engines import PlainEngine

    from .distributed import make_optimizer

    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True)
    if name == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    else:
        opt = make_optimizer(name, model, accumulation_steps=ACC)
    engine = PlainEngine(Regression(model), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         gradient_accumulation_steps=ACC, max_grad_norm=1.0, world_size=world)
    reductions = []
    if engine.ddp:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted(state, bucket):
            reductions.append(1)
            return allreduce_hook(state, bucket)

        engine.forward_module.register_comm_hook(None, counted)
    rows = slice(rank * B, (rank + 1) * B) if world > 1 else slice(None)
    for x, t in regression_batches(17, STEPS * ACC, 2 * B):
        engine.backward(engine(x=x[rows], t=t[rows]))
        engine.step()
    with torch.no_grad():  # an evaluation forward between steps takes no part in the accumulation
        engine(x=x[rows], t=t[rows])
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, len(reductions)


def worker(rank, world, out):
    for name in ("psilora", "adamw"):
        torch.save(train(name, rank, world), out / f"{name}-rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_engine")
    run_distributed(worker, 2, out)
    return out


@pytest.mark.parametrize("name", ["psilora", "adamw"])
def test_ddp_accumulation_reduces_once_per_step_and_equals_one_process(runs, name):
    want, _ = train(name, 0, 1)
    for rank in range(2):
        got, reductions = torch.load(runs / f"{name}-rank{rank}.pt")
        assert reductions == STEPS  # one bucket (a small model), reduced at each step's last micro-batch only
        for key, value in want.items():
            assert rel_err(got[key], value) <= 1e-5, (name, key)
