"""The recipe's processes: join the group a launcher describes, let rank 0 fill caches first, and
reduce numbers over the ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def setup_distributed(use_deepspeed: bool) -> tuple[int, int, torch.device]:
    """Join the process group the launcher describes (deepspeed, torchrun) or make a one-rank one;
    returns ``(rank, world size, device)``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    if use_deepspeed:
        import deepspeed

        # one process without a launcher: a one-rank group on any free port (runs side by side must not collide)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_rank0() -> bool:
    """Rank 0 of the launch, known before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


ERROR_GRACE_S = 10.0


def exit_with_error(message: str) -> None:
    """Say a user's mistake as one ``error:`` line and exit with code 2, without a traceback.

    Every rank usually meets the same mistake. A launcher stops every rank as soon as one exits, so
    the ranks other than 0 wait first: rank 0 says it and its exit ends the job. A mistake only
    another rank met is still said, by that rank, after the wait."""
    import sys
    import time

    if not is_rank0():
        time.sleep(ERROR_GRACE_S)
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # no interpreter teardown: a half-initialized process group must not hang or abort


def rank0_first(rank: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the others (caches: corpus, tokenizer, tokenized data)."""
    if rank != 0 and dist.is_initialized():
        dist.barrier()
    out = fn()
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    return out


def over_ranks(values: list[float], op: str = "mean") -> list[float]:
    """``values`` reduced over the ranks: ``mean``, ``sum`` or ``max``."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        t = t.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t.cpu().tolist()


def finish(code: int = 0) -> None:
    """Every rank leaves together and exits with ``code``, skipping the interpreter's teardown: DeepSpeed
    engines destroyed there intermittently abort a finished run (SIGABRT, "terminate called without an
    active exception"), which a job scheduler would report as a failure."""
    import logging
    import sys

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
