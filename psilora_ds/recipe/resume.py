"""What a resume keeps, applies and refuses.

A checkpoint records the run it belongs to: an id, what it trains (:func:`run_identity`: the model, the trainable
parameters' names and shapes, a digest of the model's architecture) and the run's configuration. Resuming then

- refuses, with one line, a change of what is trained (:data:`FIXED`: model, adapter rank / alpha / targets /
  scaling, method, the layout of its state) or a checkpoint at or past ``max_steps``;
- applies every other change (lr, schedule length and warm-up, clipping, the method's hyperparameters, eval and
  save cadence, ...), logging each once: the saved optimizer state keeps its tensors, the param groups take this
  run's hyperparameters, and the schedule continues from the saved step on this run's schedule
  (:func:`restore_schedule`), so the first resumed step's lr is the new schedule's at that step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from typing import Any

import torch

from .config import TrainConfig, format_value, is_builtin
from .checkpoint_files import CheckpointError

logger = logging.getLogger(__name__)

# what a run trains: a resume that changes one of these is refused (the metric's power sets the lr's unit: a run
# recorded at 1/2, the default before it was 1, resumed at 1 with its lr would take steps about 100x too large)
FIXED = ("model", "tokenizer", "tiny_hidden_size", "tiny_layers", "load_in_4bit", "bnb_4bit_quant_type",
         "bnb_4bit_use_double_quant", "lora_r", "lora_alpha", "target_modules", "use_rslora", "optim", "metric",
         "rank_multiplier", "metric_power")
# where and how a run is resumed: never reported as a change
NOT_A_CHANGE = ("resume_from_checkpoint", "output_dir", "overwrite_output_dir", "local_rank", "cache_dir")


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The run's configuration as JSON values (for the checkpoint's manifest)."""
    return json.loads(json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}))


def run_identity(cfg: TrainConfig, model: torch.nn.Module, trainable_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """What a checkpoint's weights belong to: the model as named, a digest of its architecture (its config without
    paths and versions), and the trainable parameters' names and full shapes."""
    config = getattr(model, "config", None)
    arch = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"} \
        if config is not None else {}
    return {"model": cfg.model,
            "architecture": hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest(),
            "trainable": trainable_shapes}


def check_resume(path: str, saved_step: int, saved_identity: dict[str, Any] | None, saved_config: dict[str, Any],
                 cfg: TrainConfig, identity: dict[str, Any]) -> list[str]:
    """Raise :class:`CheckpointError` (one line) for a resume this run cannot make; return the changes it applies,
    as ``"key: old -> new"`` lines (logged once by the caller)."""
    if saved_step >= cfg.max_steps:
        raise CheckpointError(f"{path} is at step {saved_step} and max_steps is {cfg.max_steps}: nothing to train; "
                              f"raise --max_steps above {saved_step} to continue this run")
    current = config_record(cfg)
    if saved_identity is None:
        logger.warning("%s was converted from the previous checkpoint format: the model and adapter it was trained "
                       "with were not recorded, so this resume cannot check them", path)
    else:
        _check_identity(path, saved_identity, saved_config, identity)
    for key in FIXED:
        if key in saved_config and saved_config[key] != current[key] and key != "model":
            raise CheckpointError(f"{path} was trained with {key}={format_value(saved_config[key])} and this run has "
                                  f"{key}={format_value(current[key])}: a resume continues the same adapter; resume "
                                  f"with --{key} {format_value(saved_config[key])}, or start a new run in another "
                                  "output_dir")
    return [f"{key}: {format_value(saved_config[key])} -> {format_value(value)}" for key, value in current.items()
            if key in saved_config and saved_config[key] != value and key not in FIXED and key not in NOT_A_CHANGE]


def _check_identity(path: str, saved: dict[str, Any], saved_config: dict[str, Any], now: dict[str, Any]) -> None:
    if saved["model"] != now["model"]:
        moved = saved["architecture"] == now["architecture"] and not is_builtin(now["model"]) and \
            not is_builtin(saved["model"]) and "/" in now["model"] and now["model"].startswith((".", "/", "~"))
        if not moved:
            raise CheckpointError(f"{path} trains an adapter of {saved['model']} and this run loads {now['model']}: "
                                  f"resume with --model {saved['model']} (an adapter belongs to its base)")
        logger.warning("%s was trained on %s; this run loads %s, a local model of the same architecture: make sure "
                       "it is the same base", path, saved["model"], now["model"])
    if saved["architecture"] != now["architecture"]:
        raise CheckpointError(f"{path} was trained on a {saved['model']} of another architecture than this run's "
                              f"{now['model']} (its config differs): resume with the base it was trained on")
    if saved["trainable"] != now["trainable"]:
        differing = sorted(k for k in set(saved["trainable"]) | set(now["trainable"])
                           if saved["trainable"].get(k) != now["trainable"].get(k))
        example = differing[0]
        raise CheckpointError(
            f"{path} holds {len(saved['trainable'])} trainable tensors and this run has {len(now['trainable'])}, "
            f"{len(differing)} differing in name or shape (e.g. {example}: saved {saved['trainable'].get(example)}, "
            f"now {now['trainable'].get(example)}): resume with the adapter settings it was saved with "
            f"(lora_r={saved_config.get('lora_r')}, target_modules={format_value(saved_config.get('target_modules'))})")


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """This run's hyperparameters of every param group (taken before a checkpoint's state replaces them)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, hyper: list[dict[str, Any]]) -> None:
    """Put this run's :func:`group_hyperparameters` back over the ones a checkpoint restored."""
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)
    resync = getattr(optimizer, "resync_param_groups", None)
    if resync is not None:  # (PSI-LoRA: the other optimizer's groups are views of these)
        resync()


def restore_schedule(scheduler, optimizer: torch.optim.Optimizer, fresh: dict[str, Any]) -> float:
    """After a checkpoint's scheduler state was loaded: continue its position (``last_epoch``) on this run's
    schedule, ``fresh`` (this run's scheduler state dict, taken before loading: its base lrs and lr functions,
    which carry the lr, warm-up and length). The lr at that position is recomputed and written into the param
    groups; returns the lr the next step takes (unchanged settings: the saved one, exactly)."""
    state = {**scheduler.state_dict(), **{k: fresh[k] for k in ("base_lrs", "lr_lambdas") if k in fresh}}
    scheduler.load_state_dict(state)
    with warnings.catch_warnings():  # (get_lr outside step() warns that get_last_lr exists; this is on purpose)
        warnings.simplefilter("ignore")
        lrs = list(scheduler.get_lr())
    scheduler.load_state_dict({**state, "_last_lr": lrs})
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    resync = getattr(optimizer, "resync_param_groups", None)
    if resync is not None:
        resync()
    return lrs[0]
