"""Shipped DeepSpeed configs use HF-style ``"auto"`` values; the recipe fills them from its own
arguments so that nothing needs editing by hand."""

from __future__ import annotations

import copy
import json
from typing import Any

from .config import ConfigError, TrainConfig

# "auto" keys that DeepSpeed's own defaults should decide: the key is dropped
DROP_IF_AUTO = {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "allgather_bucket_size", "sub_group_size"}


def read_ds_config(path: str) -> dict[str, Any]:
    """The JSON object in ``path``, or one line saying why it is not one."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except OSError as err:
        raise ConfigError(f"DeepSpeed config {path} cannot be read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                          f"{err.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, not a {type(ds).__name__}")
    return ds


def fill_auto(ds: dict[str, Any], cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """A copy of the DeepSpeed config ``ds`` (read from ``cfg.ds_config``) with its "auto" fields filled."""
    path = cfg.ds_config
    ds = copy.deepcopy(ds)
    if not isinstance(ds.get("zero_optimization", {}), dict) or not isinstance(ds.get("bf16", {}), dict) \
            or not isinstance(ds.get("fp16", {}), dict):
        raise ConfigError(f"{path}: zero_optimization, bf16 and fp16 must be JSON objects")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r}: use 0, 1, 2 or 3")
    # DeepSpeed key: (the recipe's value, where the recipe's value comes from)
    values = {
        "train_micro_batch_size_per_gpu": (cfg.micro_batch_size, "micro_batch_size"),
        "gradient_accumulation_steps": (cfg.gradient_accumulation_steps, "gradient_accumulation_steps"),
        "train_batch_size": (cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
                             f"micro_batch_size x gradient_accumulation_steps x {world_size} ranks"),
        "gradient_clipping": (cfg.max_grad_norm, "max_grad_norm"),
    }
    for key, (value, source) in values.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:  # a silent winner would train with a setting the user did not ask for
            raise ConfigError(f"{path}: {key}={ds[key]} disagrees with the recipe's {source}={value}; "
                              f"set it to \"auto\" in the config (the recipe fills it) or make them equal")
    for section, on in (("bf16", cfg.dtype == "bf16"), ("fp16", cfg.dtype == "fp16")):
        if section in ds and ds[section].get("enabled") == "auto":
            ds[section]["enabled"] = on
    if cfg.dtype in ("bf16", "fp16") and not ds.get(cfg.dtype, {}).get("enabled", False):
        raise ConfigError(f"dtype={cfg.dtype} but {path} does not enable it: add \"{cfg.dtype}\": {{\"enabled\": \"auto\"}}")
    zero = ds.get("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto" and k in DROP_IF_AUTO]:
        del zero[key]
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ConfigError(f"{path}: the recipe cannot fill \"auto\" for {left}; give values")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage_of(ds: dict[str, Any] | None) -> int | None:
    """The ZeRO stage of a filled DeepSpeed config (None: no DeepSpeed, plain PyTorch)."""
    return None if ds is None else int(ds.get("zero_optimization", {}).get("stage", 0))
