"""Steps written as *rounds*: a step that needs sums over data-parallel ranks is a generator that yields each
tensor to be summed and receives the sum back (``total = yield partial``). Driving many layers' steps in
lockstep sums all the tensors of one round in a single flattened call, so the number of collectives per
optimizer step does not grow with the number of layers (METHOD.md section 6).

A program may also yield a small SPD system (:class:`~psilora_ds.ops.linalg.SPDSolve`) and receive its
solution: the driver solves the systems that all programs are waiting on together
(:func:`~psilora_ds.ops.linalg.solve_spd_batch`: one batched factorization per round and bucket, not one per
layer, and on GPUs no host read of its status); or a pair of factors to balance
(:class:`~psilora_ds.ops.balance.Balance`), balanced together likewise (:func:`~psilora_ds.ops.balance.
balance_factors_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from .balance import Balance, balance_factors_batch
from .linalg import SPDSolve, solve_spd_batch

T = TypeVar("T")
Rounds = Generator[torch.Tensor | SPDSolve | Balance, Any, T]
Reduce = Callable[[torch.Tensor], torch.Tensor]


def host_tensor(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``values`` (known on the host) as a 1-d tensor on ``device``. On a GPU through pinned memory, without waiting:
    ``torch.tensor(values, device=...)`` copies from pageable memory, which PyTorch completes with a stream
    synchronization (the host waits for every queued kernel)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def flatten_by_dtype(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """``tensors`` copied into one flat buffer per dtype, with the tensors each holds, in the same order on every
    rank (dtypes sorted by name)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    return [(torch.cat([t.reshape(-1) for t in by_dtype[dtype]]), by_dtype[dtype])
            for dtype in sorted(by_dtype, key=str)]


def unflatten_into_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``flat`` (as :func:`flatten_by_dtype` laid them out) back into ``tensors``."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def reduce_flat_(tensors: Sequence[torch.Tensor], reduce: Reduce) -> None:
    """Sum ``tensors`` over ranks in place with one ``reduce`` call per dtype (flattened into one buffer)."""
    for flat, group in flatten_by_dtype(tensors):
        unflatten_into_(reduce(flat), group)


def run_lockstep(programs: Mapping[Hashable, Rounds[Any] | Any], reduce: Reduce | None) -> dict[Hashable, Any]:
    """Run every program (a generator as above, or an already computed value) to its return value; the tensors
    they yield in the same round are summed by one :func:`reduce_flat_` (``reduce=None``: one process, each
    tensor is its own sum). Every rank must hold programs that yield the same shapes in the same order.

    Systems and balancing are local: whenever some programs wait on a solve (or a balance), those are solved (batched)
    and advanced first, and a sum runs only once every live program waits on one, so they never split a round of
    sums."""
    results: dict[Hashable, Any] = {}
    pending: dict[Hashable, torch.Tensor | SPDSolve | Balance] = {}

    def advance(key: Hashable, value: Any) -> None:
        try:
            pending[key] = programs[key].send(value)
        except StopIteration as done:
            pending.pop(key, None)
            results[key] = done.value

    for key, program in programs.items():
        if isinstance(program, Generator):
            advance(key, None)
        else:
            results[key] = program
    while pending:
        solving = [k for k, v in pending.items() if isinstance(v, SPDSolve)]
        if solving:
            for key, solution in zip(solving, solve_spd_batch([pending[k] for k in solving])):
                advance(key, solution)
            continue
        balancing = [k for k, v in pending.items() if isinstance(v, Balance)]
        if balancing:
            for key, balanced in zip(balancing, balance_factors_batch([(pending[k].A, pending[k].B)
                                                                      for k in balancing])):
                advance(key, balanced)
            continue
        keys = list(pending)
        tensors = [pending[k].contiguous() for k in keys]
        if reduce is not None:
            reduce_flat_(tensors, reduce)
        for key, total in zip(keys, tensors):
            advance(key, total)
    return results


def run_rounds(program: Rounds[T], reduce: Reduce | None) -> T:
    """Run one program, each yielded tensor summed by its own ``reduce`` call."""
    return run_lockstep({0: program}, reduce)[0]
