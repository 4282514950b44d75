"""Faults the tests inject into real runs through ``PSILORA_DS_FAULT`` (never set in a user's run): a rank killed
like ``kill -9`` at a point of the loop, a non-finite update, a SIGTERM in the middle of a step, a full disk."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

FAULT_ENV = "PSILORA_DS_FAULT"  # "step:N" or "checkpoint:N" SIGKILLs every rank there; see fault_point


def fault_point(where: str, step: int) -> None:
    """Die like ``kill -9`` here when the tests ask for it through ``PSILORA_DS_FAULT`` (``where:step``)."""
    if os.environ.get(FAULT_ENV) == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def fault_requested(what: str, step: int) -> bool:
    """Whether the tests ask, through ``PSILORA_DS_FAULT``, for fault ``what`` at ``step``, on every rank
    (``what:N``) or on one (``what:N:RANK``); the caller injects it: ``nan:N`` an update that overflows,
    ``sigterm:N`` / ``sigint:N`` a SIGTERM / SIGINT in the middle of the step, ``enospc:N`` a full disk while saving."""
    spec = os.environ.get(FAULT_ENV, "")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return spec in (f"{what}:{step}", f"{what}:{step}:{rank}")
