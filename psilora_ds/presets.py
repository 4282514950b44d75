"""Named configurations of the optimizers, mapped to this library's units.

``paper``: the configuration the PSI-LoRA authors ran for every LLM experiment (GLUE with RoBERTa,
SQuAD v2 with T5; their repository zeligism/PSI-LoRA, ``scripts/run_compare_methods_*``), as their code
runs it:

- Scaled PSI-LoRA with K = 0 (Jacobi) inner iterations, diagonal K-FAC metric, power 1/2, damping 1e-5, a
  rank-r momentum (``rank_multiplier=1``),
  metric EMA ``beta2 = 0.99`` started at ones without bias correction (``metric_init="ones"``);
- their lr 0.2 with ``beta1 = 0.9``. With K = 0 their low-rank momentum is never updated from zero, so
  their step is ``-lr (1 - beta1) P`` (METHOD.md section 4): ``betas=(0.0, 0.99)`` and ``lr = 0.2 x 0.1 =
  0.02`` here (our lr is their lr times the LoRA scaling ``s = alpha / r = 1``). Their proximal weight is
  ``their_lr x lmbd = 0.2 x 1e-2 = 2e-3``, which is ``lr x prox`` with ``prox = 0.1`` here;
- LoRA r = alpha = 8, dropout 0.1; clipping of the full gradient at 1.0; the non-LoRA parameters
  (classification heads) on Adam(W) at 1e-4; an ordinary first step (no spectral first step).

Differences that remain: they floor the proximal weight at 1e-5 (here 1e-12: only a warm-up reaches it),
capture the layer input before LoRA dropout (here: the adapter's real input), and add a 1e-6 ridge to
the r x r systems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """``optimizer``: keyword arguments of ``optimizer_class`` (hyperparameters and shared options);
    ``lora``: ``peft.LoraConfig`` fields."""

    optimizer_class: str
    optimizer: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)

    def recipe_values(self) -> dict[str, Any]:
        """The same configuration as ``launch/train.py`` keys."""
        from .optim import METHODS

        optim = next(name for name, m in METHODS.items() if m.lora and m.build.__name__ == self.optimizer_class)
        values: dict[str, Any] = {"optim": optim}
        for key, value in self.optimizer.items():
            values[key] = list(value) if isinstance(value, tuple) else value
        values.update({"lora_r": self.lora["r"], "lora_alpha": self.lora["lora_alpha"],
                       "lora_dropout": self.lora["lora_dropout"]})
        return values


PAPER = Preset(
    optimizer_class="ScaledPSILoRA",
    optimizer=dict(lr=0.02, iters=0, betas=(0.0, 0.99), prox=0.1, damping=1e-5, metric_power=0.5, metric="kfac",
                   metric_init="ones", max_grad_norm=1.0, other_lr=1e-4, first_step_iters=None, rank_multiplier=1.0),
    lora=dict(r=8, lora_alpha=8, lora_dropout=0.1),
)

PRESETS: dict[str, Preset] = {"paper": PAPER}
