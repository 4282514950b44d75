"""Every optimizer hyperparameter, declared once: its type, its default in the recipe and the Trainer integration,
its valid range and its meaning. The optimizers check their arguments with :func:`check`; the recipe's keys,
``--help``, docs/CONFIG.md and its validation derive from these (``psilora_ds.recipe.config``), and which method
takes which is :mod:`psilora_ds.optim.registry`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ByMetric:
    """A method's default that depends on the ``metric`` it runs with (``values``: metric -> default)."""

    values: tuple[tuple[str, Any], ...]

    def resolve(self, metric: str) -> Any:
        """The default under ``metric`` (None for a metric that does not exist: its own check reports it)."""
        return dict(self.values).get(metric)

    def __str__(self) -> str:
        by_value: dict[Any, list[str]] = {}
        for metric, value in self.values:
            by_value.setdefault(value, []).append(metric)
        return ", ".join(f"{value} under metric {'/'.join(metrics)}" for value, metrics in by_value.items())


@dataclass(frozen=True)
class Hyperparameter:
    """``low``/``high``: the valid range (None: unbounded), closed unless ``low_open``/``high_open``; ``choices``:
    the valid values of a string; ``nullable``: None is valid (it means what ``help`` says); ``check``: a custom
    check returning the problem's description (for values with structure)."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this hyperparameter, as the end of an error line (None: valid)."""
        if value is None:
            return None if self.nullable else f"{self.name} cannot be null"
        if self.check is not None:
            return self.check(value)
        if self.choices is not None:
            return None if value in self.choices else \
                f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"{self.name} must be {self.range_text()}, got {value}"
        return None


def _two_betas(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and \
        all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
    return None if ok else f"betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {list(value) if isinstance(value, tuple) else value!r}"


# The momentum_prox advice, from the measurements: the stochastic linear task (issue 12, docs/BENCHMARKS.md
# "Momentum inertia") and the real-text fine-tunes (bench/finetune_real.py, bench/horizon.py).
MOMENTUM_PROX_ADVICE = ("0: off, the default; 0.2 measured best against mini-batch noise: the stochastic linear "
                        "task's excess loss down about a quarter, but 0.1% worse on the 100-step real-text fine-tune")

HYPERPARAMETERS: dict[str, Hyperparameter] = {h.name: h for h in (
    Hyperparameter("iters", int, 1, "LoRSum inner iterations (0: Jacobi, cache-free); recipe: auto = 1 while a step's activation rows fit the cache budget, else 0 (logged with the figures)", low=0),
    Hyperparameter("first_step_iters", int, 8, "spectral first step (LoRA-One): inner iterations of the first step "
                   "with lr > 0, reaching the truncated SVD of that full step (bench/finetune_real.py: better at every "
                   "lr; cache-free, iters 0: from a two-sided sketch of its gradient, no rows); null: an ordinary "
                   "first step", low=1, nullable=True),
    Hyperparameter("momentum", float, 0.9, "heavy-ball momentum", low=0, high=1, high_open=True),
    Hyperparameter("betas", list, [0.9, 0.999], "(momentum EMA, second-moment or metric EMA)",
                   check=_two_betas),
    Hyperparameter("prox", float, 1e-2, "LoRSum proximal weight relative to lr", low=0),
    Hyperparameter("damping", float, 1e-8, "metric damping, added before the power", low=0),
    Hyperparameter("metric_power", float, 0.5, "fractional power of the metric (1/2: square-root K-FAC; 1: the "
                   "metric itself)", low=0, high=1),
    Hyperparameter("metric", str, "kfac", "metric: kfac (diag E[x x^T], E[g g^T]) | shampoo (diag G^T G, G G^T; rows, "
                   "one rank) | adafactor (the factored second moment of the full gradient, Adafactor's row and column "
                   "sums of G^2 from a two-sided sketch; cache-free, any ranks)",
                   choices=("kfac", "shampoo", "adafactor")),
    Hyperparameter("metric_init", str, "zero", "metric EMA start: zero (bias-corrected like Adam) | "
                   "ones (uncorrected, the authors' code)", choices=("zero", "ones")),
    Hyperparameter("rank_multiplier", float, 1.0, "momentum rank = round(r * rank_multiplier), at most min(m, n) of "
                   "the layer", low=0, low_open=True),
    Hyperparameter("momentum_prox", float, 0.0, "the momentum update's proximal weight "
                   f"relative to its mean singular value ({MOMENTUM_PROX_ADVICE})", low=0, high=1, high_open=True),
    Hyperparameter("polar_lam", float, 1.0, "the landing field's attraction to the Stiefel manifold (the PoLAR "
                   "authors' code: 1.0; their LLaMA-2-7B scripts: 5e-3)", low=0),
    Hyperparameter("polar_core", str, "full", "the core S: full (r x r, the authors' default) | diag (diagonal)",
                   choices=("full", "diag")),
    Hyperparameter("loraplus_lr_ratio", float, 16.0, "lr of the B factors / lr of the A factors", low=0),
    Hyperparameter("riemannian_reg", float, 1e-2, "damping of the r x r preconditioners", low=0),
    Hyperparameter("weight_decay", float, 0.0, "weight decay (under the PSI-LoRA methods: of the non-LoRA parameters' AdamW)", low=0),
)}


def check(**values: Any) -> None:
    """Raise ``ValueError`` naming the first of ``values`` (hyperparameter name: value) out of its range."""
    for name, value in values.items():
        problem = HYPERPARAMETERS[name].problem(value)
        if problem:
            raise ValueError(problem)
