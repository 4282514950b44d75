"""The engine a run trains under, as one object per engine behind one protocol (:class:`Backend`), chosen in one place
(:func:`choose_backend`): plain PyTorch (one process, or DDP under torchrun), DeepSpeed (ZeRO 0-3), torch FSDP2.
``launch/train.py`` asks the backend and never branches on the engine. A new engine: one class here, with its
:class:`~psilora_ds.distributed.Distributor` in ``psilora_ds/distributed/``."""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from torch import nn

from ..distributed import Distributor, FSDP2Distributor
from .config import ConfigError, TrainConfig
from .ds_config import fill_auto, read_ds_config, zero_stage_of
from .engines import PlainEngine, TrainableParams, build_deepspeed_engine, shard_model
from .modeling import DTYPES


class Backend(Protocol):
    """What the recipe asks of the engine it runs under."""

    name: str  # as checkpoints record it: "pytorch", "fsdp2", "deepspeed-zero<stage>"
    uses_deepspeed_launcher: bool  # the process group is DeepSpeed's (deepspeed.init_distributed)
    counts_skipped_steps: bool  # the engine skips steps itself (DeepSpeed's loss scaling): logged per step

    def validate(self, cfg: TrainConfig) -> None:
        """One-line errors for settings this engine cannot run (before any process group exists)."""

    def configure(self, cfg: TrainConfig, world: int) -> None:
        """Settle what depends on the world size (DeepSpeed: its config's "auto" fields)."""

    def builds_model_partitioned(self, cfg: TrainConfig) -> bool:
        """Every rank builds the base together, partitioned from birth (ZeRO-3's ``zero.Init``)."""

    def model_arguments(self) -> dict[str, Any]:
        """``build_model``'s engine arguments: whether the engine shards the weights, the ZeRO-3 config."""

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> str | None:
        """Transform the model before the optimizer sees its parameters (FSDP2: shard it); what was done, or None."""

    def distributor(self) -> Distributor | None:
        """The PSI-LoRA optimizers' distributor (None: detected from the process group)."""

    def build(self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
              world: int) -> tuple[Any, Any, TrainableParams]:
        """``(engine, scheduler, trainable parameters)``: the engine's three calls ``engine(**batch)``,
        ``engine.backward(loss)``, ``engine.step()``, and the fp32 masters by name."""

    def checkpoint_arguments(self, model: nn.Module) -> dict[str, Any]:
        """What :func:`~psilora_ds.recipe.checkpoint.save` / ``load`` need to know of the engine."""


class PlainBackend:
    """Plain PyTorch: one process, or DDP under torchrun (:class:`~psilora_ds.recipe.engines.PlainEngine`)."""

    name = "pytorch"
    uses_deepspeed_launcher = False
    counts_skipped_steps = False
    shards = False

    def validate(self, cfg: TrainConfig) -> None:
        if cfg.dtype != "fp32":
            raise ConfigError(f"dtype={cfg.dtype} needs --ds_config (it fills the DeepSpeed config's dtype sections) or "
                              "--fsdp true; the plain PyTorch path trains in fp32")

    def configure(self, cfg: TrainConfig, world: int) -> None:
        pass

    def builds_model_partitioned(self, cfg: TrainConfig) -> bool:
        return False

    def model_arguments(self) -> dict[str, Any]:
        return {"shards_weights": self.shards}

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> str | None:
        return None

    def distributor(self) -> Distributor | None:
        return None

    def build(self, cfg, model, optimizer, scheduler, world):
        params = TrainableParams(model, optimizer)
        engine = PlainEngine(model, optimizer, scheduler, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                             max_grad_norm=cfg.max_grad_norm, world_size=world, sharded=self.shards)
        params.engine_built(None)
        return engine, scheduler, params

    def checkpoint_arguments(self, model: nn.Module) -> dict[str, Any]:
        return {"partitioned": False, "sharded_model": None}


class FSDP2Backend(PlainBackend):
    """torch FSDP2 under torchrun: ``fully_shard`` per decoder layer, then the root; the plain engine's loop (FSDP2
    reduces the gradients itself); checkpoints through torch.distributed.checkpoint."""

    name = "fsdp2"
    shards = True

    def validate(self, cfg: TrainConfig) -> None:
        if cfg.dtype == "fp16":
            raise ConfigError("dtype=fp16 under FSDP2 needs loss scaling, which the recipe provides only through "
                              "DeepSpeed: use bf16 (or --ds_config with fp16)")
        if cfg.merge_weights:
            raise ConfigError("merge_weights under FSDP2: the base is sharded over the ranks; merge afterwards from "
                              "adapter/ with peft (PeftModel.from_pretrained(base, adapter).merge_and_unload())")
        if "WORLD_SIZE" not in os.environ:
            raise ConfigError("fsdp=true needs a launcher: torchrun --nproc_per_node N launch/train.py --fsdp true ... "
                              "(N may be 1)")

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> str | None:
        return f"FSDP2: {shard_model(model, DTYPES[cfg.dtype])} decoder layers sharded, compute dtype {cfg.dtype}"

    def distributor(self) -> Distributor | None:
        return FSDP2Distributor()

    def checkpoint_arguments(self, model: nn.Module) -> dict[str, Any]:
        return {"partitioned": False, "sharded_model": model}


class DeepSpeedBackend:
    """DeepSpeed under its launcher (or one process): the engine of ``--ds_config`` (PSI-LoRA through
    :func:`psilora_ds.distributed.deepspeed.initialize`)."""

    uses_deepspeed_launcher = True
    counts_skipped_steps = True

    def __init__(self, cfg: TrainConfig):
        self.raw = read_ds_config(cfg.ds_config)
        self.config: dict[str, Any] | None = None  # filled by configure
        self.stage: int | None = None

    @property
    def name(self) -> str:
        return f"deepspeed-zero{self.stage}"

    def validate(self, cfg: TrainConfig) -> None:
        if cfg.dtype == "fp16" and not torch.cuda.is_available():
            raise ConfigError("dtype=fp16 needs a GPU (DeepSpeed refuses fp16 on CPUs); use bf16 or fp32")

    def configure(self, cfg: TrainConfig, world: int) -> None:
        self.config = fill_auto(self.raw, cfg, world)
        self.stage = zero_stage_of(self.config)

    def builds_model_partitioned(self, cfg: TrainConfig) -> bool:
        # (not 4-bit: bitsandbytes quantizes on loading, which zero.Init does not support)
        return self.stage == 3 and not cfg.load_in_4bit

    def model_arguments(self) -> dict[str, Any]:
        return {"shards_weights": self.stage == 3, "zero3_config": self.config if self.stage == 3 else None}

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> str | None:
        return None

    def distributor(self) -> Distributor | None:
        return None  # (the DeepSpeed helper attaches its own once the engine exists)

    def build(self, cfg, model, optimizer, scheduler, world):
        params = TrainableParams(model, optimizer)  # before the engine: it matches ZeRO-0 masters by position
        engine, scheduler = build_deepspeed_engine(cfg, model, optimizer, scheduler, self.config)
        params.engine_built(self.stage)
        return engine, scheduler, params

    def checkpoint_arguments(self, model: nn.Module) -> dict[str, Any]:
        return {"partitioned": bool(self.stage), "sharded_model": None}


def choose_backend(cfg: TrainConfig) -> Backend:
    """The engine ``cfg`` asks for, its settings checked (one line each)."""
    if cfg.fsdp and cfg.ds_config is not None:
        raise ConfigError("fsdp=true and ds_config are two engines: choose one (FSDP2 under torchrun, or DeepSpeed "
                          "under the deepspeed launcher)")
    backend = DeepSpeedBackend(cfg) if cfg.ds_config is not None else FSDP2Backend() if cfg.fsdp else PlainBackend()
    backend.validate(cfg)
    return backend
