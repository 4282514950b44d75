"""On a GPU every host read of a device value (``.item()``, ``.tolist()``, ``bool(t)``, ``torch.equal``, a copy from
pageable host memory) waits for every queued kernel, and the host then launches the next ones onto an idle device. The
capture hooks run inside the backward pass, so one read per layer there serializes the whole backward with the host;
the step's reads are its pauses. Counted here on the CPU by intercepting the reading calls: the hooks make none, and an
optimizer step makes the same few whatever the number of layers (the flags vector, the clipping norm, the update's
finite verdict). On CUDA (``bench/gpu_suite.sh``) PyTorch's synchronization debug mode checks the same with the
device's own accounting."""

import functools

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import psilora_ds.ops.rounds as rounds
from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA
from psilora_ds.ops.linalg import solve_spd_batch
from psilora_ds.optim.polar import PoLAR

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__index__, torch.Tensor.numpy, torch.equal, torch.allclose}


class HostReads(TorchFunctionMode):
    """Counts the calls that bring a tensor's value to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def deep_net(depth: int, *, polar: bool, width: int = 24):
    """``depth`` LoRA layers of one shape and one of another (a head), every layer adapted."""
    from peft import LoraConfig, get_peft_model

    from psilora_ds.polar_adapter import register_polar

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    base = nn.Sequential(*layers, nn.Linear(width, 8))
    targets = [str(2 * i) for i in range(depth)] + [str(2 * depth)]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    model = get_peft_model(base, register_polar(config) if polar else config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".S"):
                p.normal_(0, 0.1)
    return model


METHODS = {
    "Scaled PSI-LoRA, the default (rows)": lambda m: ScaledPSILoRA(m, 1e-3, max_grad_norm=1.0),
    "Scaled PSI-LoRA iters 0 (cache-free)": lambda m: ScaledPSILoRA(m, 1e-3, iters=0, max_grad_norm=1.0),
    "PreconditionedLoRA (cache-free)": lambda m: PreconditionedLoRA(m, 1e-2, max_grad_norm=1.0),
    "PSI-LoRA iters 2 (rows)": lambda m: PSILoRA(m, 1e-2, iters=2, momentum=0.9, max_grad_norm=1.0),
    "PoLAR (cache-free)": lambda m: PoLAR(m, 1e-3, max_grad_norm=1.0),
}


def reads_per_phase(depth: int, method: str) -> list[tuple[int, int]]:
    """``(reads in the forward and backward passes, reads in opt.step())`` of steps 3 and 4 (the first steps also
    check autograd's gradients and take the spectral step)."""
    model = deep_net(depth, polar=method.startswith("PoLAR"))
    opt = METHODS[method](model)
    out = []
    for step in range(4):
        x = torch.randn(16, 24)
        passes, stepping = HostReads(), HostReads()
        with passes:
            model(x).square().mean().backward()
        with stepping:
            opt.step()
        opt.zero_grad()
        if step >= 2:
            out.append((passes.count, stepping.count))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_hooks_read_nothing_and_a_step_reads_three_values_whatever_the_depth(method, monkeypatch):
    # the solves as on a GPU (on the CPU a failed factorization is found by one read per bucket: exact and cheap there)
    monkeypatch.setattr(rounds, "solve_spd_batch", functools.partial(solve_spd_batch, sync_free=True))
    shallow, deep = reads_per_phase(2, method), reads_per_phase(7, method)
    assert shallow == deep, (shallow, deep)
    for hooks, step in deep:
        assert hooks == 0 and step == 3, (hooks, step)  # the flags, the clipping norm, the update's verdict


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["Scaled PSI-LoRA iters 0 (cache-free)", "PreconditionedLoRA (cache-free)"])
def test_on_cuda_the_cache_free_hooks_never_synchronize(method):
    model = deep_net(4, polar=False).cuda()
    opt = METHODS[method](model)
    for step in range(4):
        x = torch.randn(16, 24, device="cuda")
        if step >= 2:
            torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
        try:
            model(x).square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.step()
        opt.zero_grad()


def test_factors_are_compared_bit_for_bit_in_stacks_and_in_order():
    from psilora_ds.distributed.base import pairs_differ

    a = torch.randn(4, 6)
    nan = torch.full((4, 6), float("nan"))
    pairs = [(a, a.clone()), (a, a + 1e-7 * a.abs().max()), (torch.zeros(3), -torch.zeros(3)),  # -0.0 is not 0.0
             (nan, nan.clone()), (a, a.double()[:2].float()), (a.double(), a.double().clone()), (a, a.clone())]
    watch = HostReads()
    with watch:
        differ = pairs_differ(pairs, torch.device("cpu"))
    assert watch.count == 0
    assert differ.tolist() == [False, True, True, False, True, False, False]
    assert pairs_differ([], torch.device("cpu")).shape == (0,)
