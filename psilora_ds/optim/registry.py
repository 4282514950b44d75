"""Every method the recipe (``--optim``), the Trainer integration (``psilora_ds.hf``) and the presets know, declared
once: its name, how it is built, which hyperparameters (:mod:`~psilora_ds.optim.hyperparameters`) it takes, and its
lr when none is given. Adding a method: its module, one :class:`Method` entry here, its tests
(docs/ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .finite_guard import skipping_non_finite
from .hyperparameters import HYPERPARAMETERS, ByMetric
from .polar import PoLAR
from .psilora import PreconditionedLoRA, PSILoRA
from .scaled import METRIC_POWER, ScaledPSILoRA
from .svdlora import SVDLoRA, SVDLoRAAdam

# the torch optimizers of the baselines (and the default of PSI-LoRA's non-LoRA parameters in the recipe), undoing
# steps that leave a non-finite value (finite_guard.py): no method writes NaN into the weights
AdamW = skipping_non_finite(torch.optim.AdamW)
SGD = skipping_non_finite(torch.optim.SGD)


@dataclass(frozen=True)
class Method:
    """``build(model, lr, **hyperparameters)`` (a PSI-LoRA-family ``lora`` method also takes the family's shared
    options, :class:`~psilora_ds.optim.options.LoRAOptions`; a baseline is built over every trainable parameter).
    ``takes``: the hyperparameters passed, by name. ``default_lr``: lr when none is given on a built-in base, the
    best mean eval loss of bench/finetune_real.py (docs/BENCHMARKS.md). ``adamw_lr_ratio``: the range of its best lr
    over LoRA-AdamW's best lr in the same cell, measured (bench/finetune_real.py, bench/quality_map.py); None where
    not measured. A best lr does not transfer between models, this ratio roughly does: it is the advice for any
    model that is not built in. ``any_engine``: False where only plain PyTorch (one process or DDP) runs it
    correctly. ``defaults``: hyperparameter defaults of this method where they differ from the registry's
    (:data:`~psilora_ds.optim.hyperparameters.HYPERPARAMETERS`), set from measurements; its class's keyword default
    is the same, so the Trainer integration and the library's users get it too (tests/test_registry.py); a
    :class:`~psilora_ds.optim.hyperparameters.ByMetric` default depends on the ``metric`` chosen (its class takes
    None for it)."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    takes: tuple[str, ...]
    default_lr: float
    adamw_lr_ratio: tuple[float, float] | None
    summary: str
    lora: bool = True
    any_engine: bool = True
    lr_measured: bool = True  # default_lr was measured (else a starting point, said so)
    adapter: str = "lora"  # the peft adapters it trains: "lora" (B A) or "polar" (B S A, psilora_ds.polar_adapter)
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)

    def default(self, name: str, settings: Any = None) -> Any:
        """The default of hyperparameter ``name`` for this method, with ``settings`` (an object with the other
        hyperparameters as attributes, e.g. the recipe's config; None: the defaults) where it depends on them."""
        value = self.defaults.get(name, HYPERPARAMETERS[name].default)
        if isinstance(value, ByMetric):
            return value.resolve(getattr(settings, "metric", None) or self.default("metric"))
        return value

    def describe_default(self, name: str) -> str:
        """The default of ``name`` as the recipe's help says it."""
        return str(self.defaults.get(name, HYPERPARAMETERS[name].default))

    @property
    def optimizer_class(self) -> type | None:
        """The PSI-LoRA-family class of a ``lora`` method (None for a baseline)."""
        return self.build if self.lora else None


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model: nn.Module, lr: float, *, betas, weight_decay: float) -> torch.optim.Optimizer:
    return AdamW(_trainable(model), lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def _sgd(model: nn.Module, lr: float, *, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return SGD(_trainable(model), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _loraplus(model: nn.Module, lr: float, *, betas, weight_decay: float, loraplus_lr_ratio: float):
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, AdamW, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, betas=tuple(betas),
                                     weight_decay=weight_decay)


def _riemannian(model: nn.Module, lr: float, *, betas, weight_decay: float, riemannian_reg: float):
    try:
        from peft.optimizers import create_riemannian_optimizer
    except ImportError:
        import peft

        raise ValueError(f"it needs peft.optimizers.create_riemannian_optimizer, which peft {peft.__version__} "
                         "lacks: pip install -U peft") from None
    return create_riemannian_optimizer(model, AdamW, lr=lr, reg=riemannian_reg, betas=tuple(betas),
                                       weight_decay=weight_decay)


# best-lr ratios to LoRA-AdamW's (docs/BENCHMARKS.md): built-in base 100 steps (AdamW 1e-2), larger base 300 steps
# python-reference r 16 and r 64 (AdamW 2.2e-3) and gnu-manuals r 16 (AdamW 4.6e-3)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("psilora", PSILoRA, ("momentum", "iters", "prox", "rank_multiplier", "momentum_prox", "first_step_iters"),
           0.1, (10, 32), "PSI-LoRA: LoRSum steps with low-rank heavy-ball momentum"),
    Method("scaled_psilora", ScaledPSILoRA, ("betas", "iters", "prox", "damping", "metric_power", "metric",
                                             "metric_init", "rank_multiplier", "momentum_prox", "first_step_iters"),
           3.16e-3, (0.1, 0.32), "Scaled PSI-LoRA: F-LoRSum under diagonal fractional K-FAC or Shampoo metrics",
           # a rank-2r momentum: below rank r in every cell of the quality map at the same lr; metric power 1 under
           # K-FAC: below or level with 1/2 in every cell, each at its own best lr (docs/BENCHMARKS.md, Quality map)
           defaults={"rank_multiplier": 2.0, "metric_power": METRIC_POWER}),
    Method("precond_lora", PreconditionedLoRA, ("prox", "first_step_iters"), 0.1, None,
           "preconditioned (scaled-GD) LoRA: PSI-LoRA's Jacobi step without momentum", lr_measured=False),
    Method("svdlora", SVDLoRA, ("momentum",), 0.1, (10, 220),
           "the SVDLoRA oracle: a dense step projected by a truncated SVD (small layers, one process)"),
    # the projection of a full Adam step: what a projected dense step reaches with Adam's direction (quality map)
    Method("svdlora_adam", SVDLoRAAdam, ("betas",), 1e-3, None,
           "the SVDLoRA oracle with Adam's direction: a full Adam step (dense moments) projected to rank r (small "
           "layers, one process)", lr_measured=False),
    # PoLAR (arXiv 2506.03133; the authors' LLaMA-2-7B lr is 10x LoRA's; 2.2-10x here)
    Method("polar", PoLAR, ("betas", "weight_decay", "polar_lam", "polar_core"), 0.0316, (2.2, 10),
           "PoLAR: polar-decomposed adapters B S A, Adam on the landing field", adapter="polar"),
    Method("adamw", _adamw, ("betas", "weight_decay"), 1e-2, (1, 1), "LoRA with AdamW", lora=False),
    # LoRA+ (arXiv 2402.12354): AdamW with the B factors at loraplus_lr_ratio x lr (peft's parameter groups)
    Method("loraplus", _loraplus, ("betas", "weight_decay", "loraplus_lr_ratio"), 1e-3, (0.1, 0.22),
           "LoRA+ (peft.optimizers): AdamW with the B factors at loraplus_lr_ratio x lr", lora=False),
    # Riemannian preconditioned LoRA (arXiv 2402.02347): AdamW on r x r-preconditioned LoRA gradients. peft's
    # preconditioner reads the gradients on the model's own parameters, which DeepSpeed's ZeRO flat partitions
    # and FSDP2's shards are not: plain PyTorch (one process or DDP) only
    Method("riemannian", _riemannian, ("betas", "weight_decay", "riemannian_reg"), 1e-2, (1, 1),
           "Riemannian LoRA (peft.optimizers): AdamW on r x r-preconditioned gradients", lora=False, any_engine=False),
    Method("sgd", _sgd, ("momentum", "weight_decay"), 2e-3, None, "SGD (not benchmarked)", lora=False,
           lr_measured=False),
)}


def lora_method_of(optimizer_class: type) -> Method:
    """The registry entry of a PSI-LoRA-family class."""
    for method in METHODS.values():
        if method.lora and method.build is optimizer_class:
            return method
    raise KeyError(f"{optimizer_class.__name__} is not a registered method")


def per_method(name: str) -> bool:
    """Whether some method has its own default of hyperparameter ``name`` (the recipe's default is then null: the
    chosen method's, :meth:`Method.default`)."""
    return any(name in m.defaults for m in METHODS.values())


def hyperparameter_arguments(method: Method, values: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``method.build`` from ``values`` (hyperparameter name: value; lists as tuples)."""
    return {k: tuple(values[k]) if isinstance(values[k], list) else values[k] for k in method.takes}
