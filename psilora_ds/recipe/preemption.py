"""Preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before killing a job) or SIGUSR1 (what SLURM
sends ahead of the time limit with ``--signal=USR1@120``) on any rank makes the run finish the optimizer step it is
in, write a checkpoint and exit non-zero (128 + the signal's number) with one line saying how to resume.

Ctrl-C (SIGINT) does the same (exit 130), so an interactive run keeps its last step; a second Ctrl-C (more than a
second later: torchrun forwards the terminal's one to its workers) stops at once (Python's KeyboardInterrupt,
nothing saved), for a step or evaluation too long to wait for.

The handler only records the signal; at the end of every step the ranks agree on it in one all-reduce of one
number, so a signal that reached a single rank stops them all at the same step.
"""

from __future__ import annotations

import os
import signal
import time

from .ranks import is_rank0, over_ranks

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAME_PRESS_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C, forwarded by a launcher


class StopRequest:
    """Records the strongest stop request (signal number) this process received (0: none)."""

    def __init__(self) -> None:
        self.signum = 0
        self._interrupted: float | None = None  # when the first Ctrl-C came: a later one stops at once
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # a process told to ignore Ctrl-C (a background job of a script) still ignores it
            self._previous[sig] = signal.signal(sig, self._record)

    def uninstall(self) -> None:
        """The handlers that were there before (a process that runs the recipe's main and goes on, such as a
        bench's pool worker, must die of SIGTERM again afterwards)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:  # (a signal handler: a store, and one raw write)
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted is not None and now - self._interrupted > SAME_PRESS_S:
                signal.default_int_handler(signum, frame)  # the second Ctrl-C: KeyboardInterrupt, now
            if self._interrupted is not None:
                return  # the same Ctrl-C again (torchrun forwards the terminal's SIGINT to its workers)
            self._interrupted = now
            if is_rank0():  # (os.write: no Python buffer that the handler could re-enter)
                os.write(2, b"\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again stops at "
                            b"once, without saving)\n")
        self.signum = max(self.signum, signum)  # (the exit code names the strongest request, as over the ranks)

    def agreed(self) -> int:
        """The signal some rank received (the largest number), or 0; every rank calls it at the same step."""
        return int(over_ranks([float(self.signum)], "max")[0])


def exit_code(signum: int) -> int:
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
