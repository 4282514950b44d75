"""Python's garbage collection at the same steps on every rank.

Python's automatic collector runs whenever enough objects were allocated since its last run: at a different moment
on every rank. A full collection walks every tracked object, about half a million once transformers and DeepSpeed are
imported and a model is built (0.2-0.3 s on a 2-core CPU: docs/BENCHMARKS.md), and in data-parallel training the
other ranks' next collective waits for the one collecting; with many ranks, some rank collects at almost every
step. So the loop freezes what setup allocated (``gc.freeze``: never walked again), turns the automatic collector
off, and collects at fixed steps on every rank at once, where the walk covers only what training allocated since
(``--gc_every``; torchtitan and torchtnt do the same). Garbage that reference counting frees (nearly all) is freed
as before; only reference cycles wait for the next collection.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


class StepGarbageCollection:
    """``every`` > 0: :meth:`start` before the loop, :meth:`after_step` after each step, :meth:`close` on the way out
    (the collector as it was before); ``every`` = 0: Python's automatic collection, untouched."""

    def __init__(self, every: int):
        if every < 0:
            raise ValueError(f"every must be >= 0 (0: Python's automatic collection), got {every}")
        self.every = every
        self.collections = 0  # collections made by :meth:`after_step`
        self._was_enabled: bool | None = None

    def start(self) -> None:
        if not self.every or self._was_enabled is not None:
            return
        self._was_enabled = gc.isenabled()
        gc.collect()  # (what setup left as garbage is not frozen)
        gc.freeze()
        gc.disable()

    def after_step(self, step: int) -> None:
        if self._was_enabled is None or step % self.every:
            return
        started = time.perf_counter()
        gc.collect()
        self.collections += 1
        logger.debug("garbage collection at step %d: %.3f s", step, time.perf_counter() - started)

    def close(self) -> None:
        if self._was_enabled is None:
            return
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None
