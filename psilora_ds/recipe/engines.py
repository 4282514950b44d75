"""The engines the recipe's backends (:mod:`psilora_ds.recipe.backends`) build, behind the DeepSpeed engine's three
calls (``engine(**batch)``, ``engine.backward(loss)``, ``engine.step()``): a DeepSpeed engine
(:func:`build_deepspeed_engine`), or :class:`PlainEngine` (one process, DDP under torchrun, or a model that
:func:`shard_model` put under torch FSDP2); and :class:`TrainableParams`, the trainable parameters by name with their
fp32 masters under any of them."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..optim.base import LoRAOptimizer


class PlainEngine:
    """Plain PyTorch: gradient accumulation, clipping for torch optimizers, DDP when world > 1 unless
    the model is already sharded (FSDP2: it reduces its gradients itself). Under DDP the training forwards of a step's
    micro-batches before its last run under ``no_sync``: DDP reduces the accumulated gradients once, at the last
    micro-batch's backward, instead of after every one (the same sum; PSI-LoRA's captured products are reduced by its
    own distributor at the step)."""

    def __init__(self, model: nn.Module, optimizer, scheduler, *, gradient_accumulation_steps: int,
                 max_grad_norm: float, world_size: int, sharded: bool = False):
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.gas = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.ddp = world_size > 1 and not sharded
        self.forward_module = nn.parallel.DistributedDataParallel(model) if self.ddp else model
        self.micro_steps = 0

    def __call__(self, **batch):
        if self._accumulating():  # (DDP decides in the forward whether its backward reduces)
            with self.forward_module.no_sync():
                return self.forward_module(**batch)
        return self.forward_module(**batch)

    def _accumulating(self) -> bool:
        """Whether this forward is a training one under DDP of a micro-batch before its step's last (evaluation
        forwards run without gradients)."""
        return self.ddp and torch.is_grad_enabled() and (self.micro_steps + 1) % self.gas != 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.gas:
            return
        if not isinstance(self.optimizer, LoRAOptimizer) and self.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def shard_model(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Put ``model`` under torch FSDP2: ``fully_shard`` on every decoder layer (the classes the model
    names in ``_no_split_modules``), then on the root; parameters stay sharded in their own dtype (the
    fp32 masters) and are gathered in ``compute_dtype``, gradients reduced in fp32. Returns the number
    of decoder layers. Call before building the optimizer: the parameters become DTensors."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .config import ConfigError

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"fsdp=true: {type(model).__name__} names no decoder-layer class (_no_split_modules), "
                          "so it cannot be sharded layer by layer; use DeepSpeed (--ds_config) for this model")
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return len(layers)


def build_deepspeed_engine(cfg, model: nn.Module, optimizer, scheduler, ds_config: dict):
    """``(engine, scheduler)``: the DeepSpeed engine of ``ds_config`` (PSI-LoRA through
    :func:`psilora_ds.distributed.deepspeed.initialize`; a torch optimizer through ``deepspeed.initialize``)."""
    import deepspeed

    from ..distributed import deepspeed as psilora_deepspeed
    from .config import ConfigError

    if isinstance(optimizer, LoRAOptimizer):
        init = psilora_deepspeed.initialize
    else:
        init = deepspeed.initialize
        ds_config.setdefault("zero_allow_untested_optimizer", True)
    try:
        engine, _, _, scheduler = init(model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler)
    except ValueError as err:  # the helper's one-line refusals (optimizer section, offload, model parallel...)
        raise ConfigError(f"{cfg.ds_config}: {err}") from None
    return engine, scheduler


class TrainableParams:
    """The trainable parameters by name, read and written as full fp32 masters whatever the engine.

    - plain PyTorch: the parameters themselves;
    - DeepSpeed ZeRO 1-3: ``deepspeed.utils.safe_get/set_full_fp32_param`` (collectives: call on every
      rank), and the low-precision model copy written as well (under ZeRO-3 through
      ``deepspeed.zero.GatheredParameters``);
    - DeepSpeed ZeRO 0: the masters are the tensors the engine put in the optimizer's param groups in
      place of the parameters (the same tensors in fp32), matched by position, which is why this
      object is built before the engine;
    - FSDP2: the parameters are DTensor shards of the fp32 masters (``full_tensor``, a collective:
      call on every rank); only read here: FSDP2 checkpoints load through torch.distributed.checkpoint.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = {id(p): n for n, p in self.named}
        self._group_names = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
        self._optimizer = optimizer
        self.masters: dict[str, torch.Tensor] = dict(self.named)

    def engine_built(self, zero_stage: int | None) -> None:
        """Call once the engine exists (``None``: plain PyTorch)."""
        if zero_stage == 0:
            for names, group in zip(self._group_names, self._optimizer.param_groups):
                for name, master in zip(names, group["params"]):
                    if name is not None:
                        self.masters[name] = master

    def numel(self) -> int:
        """Trainable parameter count (ZeRO-3 partitions report their full size)."""
        return sum(getattr(p, "ds_numel", p.numel()) for _, p in self.named)

    def shapes(self) -> dict[str, list[int]]:
        """Every trainable parameter's full shape by name (ZeRO-3 partitions and FSDP2 shards too)."""
        return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in self.named}

    @staticmethod
    def _partitioned(p: torch.Tensor) -> bool:
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def state(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter as a full fp32 CPU tensor (a collective at ZeRO >= 1: call on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.named:
            if isinstance(p, DTensor):
                full = p.detach().full_tensor()
            else:
                full = safe_get_full_fp32_param(p) if self._partitioned(p) else self.masters[name].detach()
            out[name] = full.float().cpu()
        return out

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Write :meth:`state`'s tensors into masters and parameters (every rank calls it)."""
        missing = sorted({n for n, _ in self.named} - set(state))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} trainable parameters of this model "
                             f"(e.g. {missing[0]}): resume with the model and LoRA settings it was saved with")
        for name, p in self.named:
            value = state[name]
            if hasattr(p, "ds_id"):  # ZeRO-3: the model copy is partitioned; rank 0 writes, the context re-shards
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if not dist.is_initialized() or dist.get_rank() == 0:
                        p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))
            if self._partitioned(p):
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, value.to(device=p.device, dtype=torch.float32))
            elif self.masters[name] is not p:
                self.masters[name].data.copy_(value)
