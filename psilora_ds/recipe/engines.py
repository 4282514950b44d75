"""The two ways the recipe drives training, behind the DeepSpeed engine's three calls
(``engine(**batch)``, ``engine.backward(loss)``, ``engine.step()``) and checkpoint save/load:
a DeepSpeed engine, or :class:`PlainEngine` (one process, or DDP under torchrun)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..optim.base import LoRAOptimizer


class PlainEngine:
    """Plain PyTorch: gradient accumulation, clipping for torch optimizers, DDP when world > 1."""

    def __init__(self, model: nn.Module, optimizer, scheduler, *, gradient_accumulation_steps: int,
                 max_grad_norm: float, world_size: int):
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.gas = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.forward_module = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        self.micro_steps = 0

    def __call__(self, **batch):
        return self.forward_module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.gas:
            return
        if not isinstance(self.optimizer, LoRAOptimizer) and self.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(self, root: str, tag: str) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        path = os.path.join(root, tag)
        os.makedirs(path, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.lr_scheduler.state_dict()}, os.path.join(path, "state.pt"))

    def load_checkpoint(self, root: str, tag: str) -> None:
        state = torch.load(os.path.join(root, tag, "state.pt"), map_location="cpu", weights_only=False)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter as a full fp32 CPU tensor: DeepSpeed's fp32 masters where it has them
    (a collective at ZeRO >= 1: call on every rank), else the parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p) if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") else None
            out[name] = (full if full is not None else p.detach()).float().cpu()
    return out


def save_rng(path: str, rank: int) -> None:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(path, f"rng-rank{rank}.pt"))


def load_rng(path: str, rank: int) -> None:
    file = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: resume with the number of ranks that saved {path}")
    state = torch.load(file, weights_only=False)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_trainer_state(path: str, step: int, world_size: int, extra: dict[str, Any]) -> None:
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "world_size": world_size, **extra}, f, indent=1)


def read_trainer_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
