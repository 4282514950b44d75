"""Where a run's metrics go, behind one small protocol (:class:`MetricLogger`), chosen by ``--report_to``
(transformers' key and names): ``metrics.jsonl`` always (the loss plot and resumes read it), plus ``tensorboard``
(event files under ``output_dir/tensorboard``, written by torch's ``SummaryWriter`` over the ``tensorboard``
package) and ``wandb`` (Weights & Biases; ``WANDB_MODE=offline`` works with no network; a resumed run continues
the same W&B run, whose id is the checkpoint's run id). Rank 0 only.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from .config import REPORT_TO, ConfigError


class MetricLogger(Protocol):
    """What the training loop asks of a metrics destination."""

    def log(self, record: dict[str, Any]) -> None:
        """One record: ``step`` and the numbers measured at that step."""

    def close(self, exit_code: int) -> None:
        """Flush and release at the end of the run: ``exit_code`` is the run's (0 finished; 128 + N stopped by
        signal N after saving its step, to be resumed; anything else failed)."""


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars under ``output_dir/tensorboard``; a resumed run drops the events after its step (``purge_step``)."""

    def __init__(self, output_dir: str, resumed_at: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                    purge_step=None if resumed_at is None else resumed_at + 1)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self, exit_code: int) -> None:
        self.writer.close()


class WandbLogger:
    """One W&B run per training run (``id`` = the run id the checkpoints carry, so a resume continues it)."""

    def __init__(self, output_dir: str, run_id: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError("report_to=wandb needs the wandb package: pip install wandb") from None
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "psilora_ds"), id=run_id, resume="allow",
                              dir=output_dir, config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self, exit_code: int) -> None:
        """W&B shows how the run ended: a stop by signal is marked preempting (a resume continues the run), and a
        failed run is not reported as finished."""
        if exit_code > 128:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)


def report_to(value: str) -> list[str]:
    """``--report_to`` as logger names (``jsonl`` always first; the names were checked by the config)."""
    names = {n.strip() for n in value.split(",")}
    return [n for n in REPORT_TO if n == "jsonl" or n in names]


def build_loggers(names: list[str], output_dir: str, *, run_id: str, resumed_at: int | None,
                  config: dict[str, Any]) -> list[MetricLogger]:
    """The loggers besides ``metrics.jsonl`` (which the caller keeps: the plot and resumes read it)."""
    loggers: list[MetricLogger] = []
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(output_dir, resumed_at))
    if "wandb" in names:
        loggers.append(WandbLogger(output_dir, run_id, config))
    return loggers
