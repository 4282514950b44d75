"""Preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before killing a job) or SIGUSR1 (what SLURM
sends ahead of the time limit with ``--signal=USR1@120``) on any rank makes the run finish the optimizer step it is
in, write a checkpoint and exit non-zero (128 + the signal's number) with one line saying how to resume.

The handler only records the signal; at the end of every step the ranks agree on it in one all-reduce of one
number, so a signal that reached a single rank stops them all at the same step.
"""

from __future__ import annotations

import signal

from .ranks import over_ranks

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the last preemption signal this process received (0: none)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def uninstall(self) -> None:
        """The handlers that were there before (a process that runs the recipe's main and goes on, such as a
        bench's pool worker, must die of SIGTERM again afterwards)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:  # (a signal handler: nothing but a store)
        self.signum = signum

    def agreed(self) -> int:
        """The signal some rank received (the largest number), or 0; every rank calls it at the same step."""
        return int(over_ranks([float(self.signum)], "max")[0])


def exit_code(signum: int) -> int:
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
