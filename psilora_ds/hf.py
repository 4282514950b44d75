"""PSI-LoRA inside transformers' ``Trainer`` (and its subclasses, e.g. TRL's ``SFTTrainer``), through its
public extension points: a subclass that overrides ``create_optimizer`` / ``create_scheduler``.

    from psilora_ds.hf import PSILoRATrainer
    trainer = PSILoRATrainer(model=peft_model, args=TrainingArguments(..., max_grad_norm=1.0), train_dataset=ds,
                             psilora=dict(optim="scaled_psilora", lr=1e-3))
    trainer.train()

    SFT = psilora_trainer(trl.SFTTrainer)   # any Trainer subclass

What the integration does that ``Trainer(optimizers=(opt, sched))`` cannot:
- it works under the Trainer's DeepSpeed path, which discards ``optimizers=`` and builds its own AdamW
  (without this, PSI-LoRA's hooks capture and nothing steps: the capture guard raises
  :class:`~psilora_ds.capture.StepNotCalledError`): the optimizer is built in ``create_optimizer``, from the
  final (peft-wrapped) model, and the DeepSpeed distributor is attached in ``create_scheduler``, the first
  overridable method that runs once ``accelerator.prepare`` has built the engine (and before a checkpoint
  is loaded into it);
- clipping: ``TrainingArguments.max_grad_norm`` (or the DeepSpeed config's ``gradient_clipping``, which the
  Trainer fills from it) becomes PSI-LoRA's full-gradient clipping norm, and the Trainer's and DeepSpeed's
  own clipping of ``p.grad`` is turned off (``args.max_grad_norm`` is set to 0 on the Trainer's args; the
  engine's ``gradient_clipping`` to 0) so nothing is clipped twice;
- gradient accumulation: the optimizer is told ``args.gradient_accumulation_steps``;
- ``fp16=True`` is refused without DeepSpeed: the Trainer's GradScaler path (through accelerate, GPU only) is untested
  with PSI-LoRA, although the optimizer follows a ``torch.amp.GradScaler`` in a plain loop
  (:mod:`~psilora_ds.optim.amp_scaling`); bf16, or fp16 under DeepSpeed (whose loss scale the distributor reads), train.
The LR scheduler, ``save_steps`` checkpoints and ``resume_from_checkpoint`` are the Trainer's own (the
optimizer's ``state_dict`` round-trips through them).
"""

from __future__ import annotations

import logging
from typing import Any

from .optim import OPTIMIZERS_BY_NAME
from .optim.base import LoRAOptimizer

logger = logging.getLogger(__name__)


def build_lora_optimizer(model, optim: str = "scaled_psilora", **kwargs: Any) -> LoRAOptimizer:
    """``optim``'s class on ``model`` with ``kwargs`` (its hyperparameters and the shared options)."""
    if optim not in OPTIMIZERS_BY_NAME:
        raise ValueError(f"psilora optim={optim!r}: choose one of {', '.join(OPTIMIZERS_BY_NAME)}")
    return OPTIMIZERS_BY_NAME[optim](model, **kwargs)


def psilora_trainer(base: type) -> type:
    """A subclass of the Trainer class ``base`` that trains with a PSI-LoRA optimizer.

    It takes one extra keyword argument, ``psilora``: a dict with ``optim`` (``psilora``,
    ``scaled_psilora``, ``precond_lora``, ``svdlora``, ``polar``: the registry's methods) and the optimizer's keyword arguments (``lr``
    defaults to ``args.learning_rate``), or a callable ``model -> LoRAOptimizer``.
    """

    from transformers import TrainerCallback

    class RefreshFactorsAtTrainBegin(TrainerCallback):
        """At the start of training, after the Trainer restored a checkpoint (under DeepSpeed the engine restores
        the fp32 masters after the optimizer's state): cache-free steps take their factor copy again."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            if self.trainer.psilora_optimizer is not None:
                self.trainer.psilora_optimizer.refresh_factors()

    class PSILoRATrainerOf(base):
        def __init__(self, *args: Any, psilora: dict[str, Any] | Any = None, **kwargs: Any):
            if kwargs.get("optimizers", (None, None))[0] is not None:
                raise ValueError("pass the PSI-LoRA settings as psilora=..., not optimizers=(...): the Trainer "
                                 "replaces the latter under DeepSpeed")
            super().__init__(*args, **kwargs)
            if self.is_deepspeed_enabled and "optimizer" in self.accelerator.state.deepspeed_plugin.deepspeed_config:
                raise ValueError("the DeepSpeed config has an 'optimizer' section: the Trainer would then train with "
                                 "DeepSpeed's optimizer and never build PSI-LoRA; remove the section")
            if self.is_fsdp_enabled:
                raise ValueError("PSI-LoRA through the Trainer's FSDP path is not supported yet (untested); use "
                                 "DeepSpeed, DDP, or your own loop with psilora_ds.distributed.FSDP2Distributor")
            if self.args.fp16 and not self.is_deepspeed_enabled:
                raise ValueError("fp16=True without DeepSpeed: the Trainer then scales the loss with torch.amp's "
                                 "GradScaler through accelerate, a path not tested with PSI-LoRA (it needs a GPU; the "
                                 "optimizer itself follows a GradScaler in a plain loop); use bf16=True, or fp16 "
                                 "through a DeepSpeed config (whose loss scale the optimizer reads)")
            self.psilora = psilora if psilora is not None else {}
            self.psilora_optimizer: LoRAOptimizer | None = None
            # PSI-LoRA clips the full gradient itself; the Trainer must not clip p.grad (it would also
            # scale the LoRA gradients PSI-LoRA reuses in one process)
            self.psilora_clip = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 \
                else None
            self.args.max_grad_norm = 0.0
            self.add_callback(RefreshFactorsAtTrainBegin(self))

        def create_optimizer(self, model=None):
            if self.optimizer is not None:
                return self.optimizer
            model = model if model is not None else self.model
            if callable(self.psilora):
                optimizer = self.psilora(model)
            else:
                settings = {"lr": self.args.learning_rate, **self.psilora}
                optimizer = build_lora_optimizer(model, **settings)
            if not isinstance(optimizer, LoRAOptimizer):
                raise TypeError(f"psilora= built a {type(optimizer).__name__}, not a psilora_ds optimizer")
            optimizer.max_grad_norm = self.psilora_clip
            if self.is_deepspeed_enabled:
                from .distributed.deepspeed import prepare_config

                ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
                ds_config["gradient_clipping"] = self.psilora_clip or 0.0  # as the Trainer filled it from max_grad_norm
                cleaned, _ = prepare_config(ds_config, optimizer)  # its checks; engine clipping off, optimizer allowed
                ds_config.clear()
                ds_config.update(cleaned)
            optimizer.set_accumulation_steps(self.args.gradient_accumulation_steps)
            self.optimizer = self.psilora_optimizer = optimizer
            logger.info("PSI-LoRA: %s, full-gradient clipping at %s, %d micro-batches per step",
                        type(optimizer).__name__, self.psilora_clip, self.args.gradient_accumulation_steps)
            return optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            # the Trainer calls this right after accelerator.prepare: the DeepSpeed engine exists now
            self._attach_engine()
            return super().create_scheduler(num_training_steps, optimizer=self.psilora_optimizer or optimizer)

        def _attach_engine(self) -> None:
            if not self.is_deepspeed_enabled or self.psilora_optimizer is None:
                return
            from .distributed.deepspeed import DeepSpeedDistributor, check_world

            engine = self.accelerator.deepspeed_engine_wrapped.engine
            if getattr(self.psilora_optimizer.distributor, "engine", None) is engine:
                return
            check_world(engine)
            self.psilora_optimizer.attach(DeepSpeedDistributor(engine,
                                                               on_skipped_step=self.psilora_optimizer.discard_step))

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if self.psilora_optimizer is not None and self.psilora_optimizer.last_grad_norm is not None \
                    and "loss" in logs:
                logs = {**logs, "grad_norm": self.psilora_optimizer.last_grad_norm}
            super().log(logs, *args, **kwargs)

    PSILoRATrainerOf.__name__ = PSILoRATrainerOf.__qualname__ = f"PSILoRA{base.__name__}"
    return PSILoRATrainerOf


def __getattr__(name: str):
    # PSILoRATrainer = psilora_trainer(transformers.Trainer), built on first use (transformers imports slowly)
    if name == "PSILoRATrainer":
        from transformers import Trainer

        globals()[name] = psilora_trainer(Trainer)
        return globals()[name]
    raise AttributeError(name)
