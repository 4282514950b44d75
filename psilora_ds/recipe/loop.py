"""One optimizer step (its micro-batches) and one evaluation, over any engine with the DeepSpeed
engine's three calls; the metrics record of a step."""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..optim.base import LoRAOptimizer
from .checkpoint import resolve_resume
from .faults import fault_point, fault_requested
from .config import ConfigError, TrainConfig
from .data import IGNORE, collate
from .ranks import over_ranks


def train_step(engine, stream: Iterator[dict[str, torch.Tensor]], cfg: TrainConfig, step: int,
               device: torch.device, world: int) -> dict[str, float]:
    """The micro-batches of optimizer step ``step`` (1-based): forward, backward, engine step each."""
    start = time.perf_counter()
    losses, tokens = [], 0.0
    for _ in range(cfg.gradient_accumulation_steps):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        loss = engine(**batch, use_cache=False).loss  # (a KV cache would copy every layer's keys and values)
        engine.backward(loss)
        fault_point("step", step)
        for name, signum in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
            if fault_requested(name, step):  # (tests: a preemption notice or a Ctrl-C in the middle of a step)
                os.kill(os.getpid(), signum)
        engine.step()
        losses.append(float(loss.detach()))
        tokens += float(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    loss_mean, tokens_all = over_ranks([sum(losses) / len(losses), tokens * world])
    return {"step": step, "loss": loss_mean, "step_time": elapsed, "tokens_per_s": tokens_all / elapsed}


def skipped_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps the optimizer did not apply because a value was not finite (its own and its other optimizer's)."""
    other = getattr(optimizer, "other_optimizer", None)
    return getattr(optimizer, "skipped_steps", 0) + getattr(other, "skipped_steps", 0)


class DivergenceStop:
    """Counts the steps in a row that the optimizer skipped because their update was not finite, and stops the run
    with one line at ``limit`` (0: never), naming the checkpoint to resume from (every rank: the skips agree)."""

    def __init__(self, optimizer: torch.optim.Optimizer, limit: int):
        self.optimizer = optimizer
        self.limit = limit
        self.seen = skipped_steps(optimizer)
        self.in_a_row = 0

    def after_step(self, step: int, checkpoint_root: str) -> None:
        now = skipped_steps(self.optimizer)
        self.in_a_row = self.in_a_row + 1 if now > self.seen else 0
        self.seen = now
        if not self.limit or self.in_a_row < self.limit:
            return
        try:
            newest = resolve_resume("latest", checkpoint_root)  # (a collective: every rank is here together)
        except ConfigError:  # none that verifies
            newest = None
        raise ConfigError(f"step {step}: {self.in_a_row} steps in a row were skipped because their updates were not "
                          "finite: the run has diverged (nothing non-finite was applied or saved). Resume "
                          f"{'from ' + newest if newest else 'with a new run'} with a lower --lr (a resume applies "
                          "it) or a stronger --max_grad_norm")


def inject_overflow(optimizer: torch.optim.Optimizer) -> None:
    """Tests (``PSILORA_DS_FAULT=nan:N``): an infinite lr, so that step N's update is not finite although its
    gradients are (the schedule sets the lr again at the next step)."""
    for group in optimizer.param_groups:
        group["lr"] = float("inf")


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """PSI-LoRA's own numbers for a metrics record (a torch baseline: its skipped steps)."""
    if not isinstance(optimizer, LoRAOptimizer):
        return {"skipped_steps": skipped_steps(optimizer)}
    state = optimizer.state_nbytes()
    (state_max,), (state_total,) = over_ranks([state], "max"), over_ranks([state], "sum")
    return {"grad_norm": optimizer.last_grad_norm, "skipped_steps": skipped_steps(optimizer),
            "cache_bytes": optimizer.last_cache_bytes, "state_bytes_rank_max": int(state_max),
            "state_bytes_total": int(state_total)}


@torch.no_grad()
def evaluate(engine, model, eval_ds, cfg: TrainConfig, rank: int, world: int, pad_id: int,
             device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss over one pass of the held-out split, and its perplexity: rank ``k`` takes
    sequences ``k, k + world, ...`` in micro-batches, each sequence counted once (``eval_batches`` > 0: at most
    that many micro-batches per rank, the first of the pass). Every rank runs the same number of forwards
    (ZeRO-3 and FSDP2 gather parameters in them): a rank out of sequences repeats one with no label counted."""
    model.eval()
    mine = list(range(rank, len(eval_ds), world))
    n_batches = math.ceil(math.ceil(len(eval_ds) / world) / cfg.micro_batch_size)
    if cfg.eval_batches > 0:
        n_batches = min(n_batches, cfg.eval_batches)
    total = [0.0, 0.0]
    for b in range(n_batches):
        rows = mine[b * cfg.micro_batch_size:(b + 1) * cfg.micro_batch_size]
        batch = collate([eval_ds[i] for i in (rows or mine[-1:])], pad_id)
        if not rows:
            batch["labels"].fill_(IGNORE)
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = float((batch["labels"][:, 1:] != IGNORE).sum())
        loss = engine(**batch, use_cache=False).loss
        if tokens > 0:  # (no counted label: the loss is 0 / 0)
            total[0] += float(loss) * tokens
            total[1] += tokens
    model.train()
    loss_sum, tokens = over_ranks(total)
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
