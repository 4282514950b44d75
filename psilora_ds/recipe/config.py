"""The recipe's configuration: one YAML file (``--config``) plus ``--key value`` overrides.

Every key, its default and its meaning is the dataclass below; ``python launch/train.py --help``
prints them. An unknown key is a one-line error listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..capture import parse_cache_budget
from ..optim.hyperparameters import HYPERPARAMETERS
from ..optim.registry import METHODS, per_method


class ConfigError(ValueError):
    """A configuration mistake, reported as one line."""


def opt(default: Any, help: str) -> Any:
    """A config field with its meaning: ``--help`` and docs/CONFIG.md are generated from these."""
    return field(default=default, metadata={"help": help})


def hyper(name: str) -> Any:
    """The config field of a method hyperparameter: its default and meaning from the registry, and the methods that
    take it."""
    h = HYPERPARAMETERS[name]
    users = [m for m in METHODS.values() if name in m.takes]
    help = f"{', '.join(m.name for m in users) or 'no method'}: {h.help}"
    if per_method(name):  # null: the chosen method's default (filled in by TrainConfig.__post_init__)
        defaults = ", ".join(f"{m.name} {m.describe_default(name)}" for m in users)
        return opt(None, f"{help}; null: the method's default ({defaults})")
    if isinstance(h.default, list):
        return field(default_factory=lambda: list(h.default), metadata={"help": help})
    return opt(h.default, help)


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------------
    model: str = opt("builtin:stdlib-llama", "HF hub id or local path of a causal LM; builtin:stdlib-llama: a small LLaMA pretrained on Python's standard-library source (ships in psilora_ds/assets, launch/pretrain_base.py); builtin:tiny-llama: a randomly initialized LLaMA built from the tiny_* keys")
    tokenizer: str | None = opt(None, "defaults to the model's; builtin:tiny-llama: a byte-level BPE trained on the generated corpus")
    tiny_hidden_size: int = opt(128, "builtin:tiny-llama: hidden size")
    tiny_layers: int = opt(4, "builtin:tiny-llama: decoder layers")
    load_in_4bit: bool = opt(False, "QLoRA: load the base model in 4 bit with bitsandbytes")
    bnb_4bit_quant_type: str = opt("nf4", "nf4 | fp4")
    bnb_4bit_use_double_quant: bool = opt(True, "quantize the quantization constants too")
    bnb_4bit_compute_dtype: str = opt("bfloat16", "dtype of the 4-bit matmuls")
    bnb_4bit_quant_storage: str = opt("auto", "auto: the DeepSpeed/engine dtype (needed to shard 4-bit weights under ZeRO-3)")
    gradient_checkpointing: bool = opt(False, "HF gradient checkpointing (non-reentrant)")
    # --- LoRA ------------------------------------------------------------------------------------
    lora_r: int = opt(16, "adapter rank")
    lora_alpha: float = opt(32.0, "scaling numerator: alpha / r (alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = opt(0.05, "dropout on the adapter input")
    target_modules: Any = opt("all-linear", "\"all-linear\" or a list of module names (q_proj, v_proj, ...)")
    use_rslora: bool = opt(False, "rank-stabilized scaling alpha / sqrt(r)")
    # --- data ------------------------------------------------------------------------------------
    dataset: str = opt("builtin:python-reference", "HF dataset id or a local .json/.jsonl/.parquet/.txt/.csv; builtin:python-reference: the English language reference that ships with Python (pydoc_data topics; a fixed held-out split of 8 topics is the eval set); builtin:gnu-manuals: the GNU Info manuals of grep, sed, diffutils, gzip, bzip2, bc, ed, time under /usr/share/info (Debian; every tenth node held out); builtin:generated: a generated corpus of templated sentences and sums")
    dataset_config: str | None = opt(None, "HF dataset configuration name")
    dataset_split: str = opt("train", "split to read")
    text_field: str = opt("text", "column with the text (when no prompt/response fields)")
    prompt_field: str | None = opt(None, "column with the prompt: its tokens get no loss")
    response_field: str | None = opt(None, "column with the response (set together with prompt_field)")
    prompt_template: str = opt("{prompt}\n", "how the prompt is written before the response")
    max_seq_len: int = opt(128, "tokens per training sequence")
    packing: bool = opt(True, "concatenate documents and cut into max_seq_len blocks")
    eval_fraction: float = opt(0.05, "share of sequences held out for evaluation (builtin:python-reference: its fixed held-out topics; 0: no evaluation)")
    corpus_lines: int = opt(4000, "builtin:generated: generated lines")
    cache_dir: str = opt(".cache/psilora_ds", "tokenizer, generated corpus, tokenized data, the saved tiny LLaMA")
    # --- optimizer -------------------------------------------------------------------------------
    preset: str | None = opt(None, "paper: the PSI-LoRA authors' LLM configuration (psilora_ds/presets.py) for every key not given explicitly")
    optim: str = opt("scaled_psilora", "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    lr: float | None = opt(None, "learning rate (PSI-LoRA: step size of the effective weight); null: on a built-in base, per optim, the best of bench/finetune_real.py (scaled_psilora 0.1, adamw 1e-2; logged); any other model must be given one (best lrs do not transfer between models; the refusal says where to start: scaled_psilora 10-22x LoRA-AdamW's lr)")
    # the methods' hyperparameters: default, range and meaning declared once, in psilora_ds/optim/hyperparameters.py
    iters: int | str = hyper("iters")
    first_step_iters: int | None = hyper("first_step_iters")
    momentum: float = hyper("momentum")
    betas: list = hyper("betas")
    prox: float = hyper("prox")
    damping: float = hyper("damping")
    metric_power: float | None = hyper("metric_power")
    metric: str = hyper("metric")
    metric_init: str = hyper("metric_init")
    rank_multiplier: float | None = hyper("rank_multiplier")
    momentum_prox: float = hyper("momentum_prox")
    polar_lam: float = hyper("polar_lam")
    polar_core: str = hyper("polar_core")
    loraplus_lr_ratio: float = hyper("loraplus_lr_ratio")
    riemannian_reg: float = hyper("riemannian_reg")
    weight_decay: float = hyper("weight_decay")
    other_lr: float = opt(1e-4, "lr of non-LoRA trainable parameters (heads, norms, modules_to_save; AdamW), independent of the LoRA lr")
    lr_scheduler: str = opt("cosine", "cosine | linear | constant (all with linear warm-up)")
    warmup_steps: int = opt(10, "warm-up optimizer steps")
    max_grad_norm: float = opt(1.0, "full-gradient clipping norm (fills \"auto\" in the DeepSpeed config); 0: off")
    clip_norm_probes: int = opt(0, "clipping norm: 0 exact in one process (several ranks: 16-probe sketch); k > 0: random-sign sketch with k probes")
    cache_free: bool | None = opt(None, "keep no activation rows: thin products accumulated in the hooks, exact for Jacobi steps (iters 0, K-FAC metric) and PoLAR; null: on where possible; true: required (error otherwise); false: keep rows")
    cache_max_bytes: str | None = opt("auto", "PSI-LoRA activation-cache budget per rank (bytes, or 8GiB, 512MiB): rows kept (fastest) while they fit, layers folded to dense fp32 over it; auto: a quarter of the memory of the device holding the rows, over the ranks sharing it; null: no budget, fold each layer once dense is smaller")
    cache_offload: bool = opt(False, "PSI-LoRA on GPUs: rows over the cache budget go to pinned host memory instead of being folded, read back for each product (less GPU memory, more host-link traffic)")
    # --- run -------------------------------------------------------------------------------------
    ds_config: str | None = opt(None, "DeepSpeed JSON config; null: plain PyTorch (one process, or DDP under torchrun)")
    fsdp: bool = opt(False, "torch FSDP2 under torchrun: fully_shard per decoder layer, then the root; checkpoints through torch.distributed.checkpoint")
    dtype: str = opt("fp32", "fp32 | bf16 | fp16: fills \"auto\" dtype sections of the DeepSpeed config; FSDP2: the compute dtype (MixedPrecisionPolicy)")
    micro_batch_size: int = opt(8, "sequences per rank per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(300, "optimizer steps")
    eval_every: int = opt(25, "evaluate every N optimizer steps (and at the end)")
    eval_batches: int = opt(0, "micro-batches per rank per evaluation, the first of a pass over the held-out split (0: the whole split, each sequence once)")
    log_every: int = opt(1, "write a metrics line every N steps")
    save_every: int = opt(50, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int = opt(2, "keep the newest N checkpoints")
    resume_from_checkpoint: str | None = opt(None, "a checkpoint directory, or \"latest\" in output_dir (the newest that verifies); the model and adapter must be the ones it trained, other changes (lr, max_steps, ...) apply and are logged")
    overwrite_output_dir: bool = opt(False, "a run that does not resume, into an output_dir holding checkpoints: delete them (else refused)")
    gc_every: int = opt(50, "collect Python's garbage every N steps, on every rank at once, after freezing what setup allocated (Python's automatic collections come at a different moment on each rank, and the others' collectives wait for it); 0: Python's automatic collection")
    max_skipped_steps: int = opt(10, "stop with an error after this many consecutive steps skipped for non-finite values (0: never)")
    merge_weights: bool = opt(False, "also save the base model with the adapter merged in")
    output_dir: str = opt("runs/default", "metrics.jsonl, loss.png, adapter/, checkpoints/")
    report_to: str = opt("jsonl", "metric loggers, comma-separated: jsonl (always: metrics.jsonl) | tensorboard (output_dir/tensorboard) | wandb (WANDB_MODE=offline works without network; WANDB_PROJECT names the project)")
    seed: int = opt(0, "model init, data order, dropout")
    local_rank: int = opt(-1, "set by the deepspeed launcher")

    def __post_init__(self) -> None:
        """A per-method hyperparameter left null takes the chosen method's default, however the config was made (so a
        checkpoint records the value the run trained with); an unknown ``optim`` is left for the registry's check."""
        method = METHODS.get(self.optim)
        for name in method.takes if method is not None else ():
            if per_method(name) and getattr(self, name) is None:
                setattr(self, name, method.default(name, self))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a CLI string or YAML value into the field's type (1e-3 is a float even where YAML 1.1
    reads it as a string; true/false, [a, b] and null as in YAML)."""
    kind = str(FIELDS[name].type)
    if isinstance(value, str):
        if value.strip().lower() in ("null", "none", "~") and "None" in kind:
            return None
        if kind.startswith("str"):
            return value
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{name}={value!r} is not a valid {kind} (YAML syntax: 1e-3, true, [a, b], null)") from None
    if value is None:
        if "None" in kind or kind == "Any":
            return None
        raise ConfigError(f"{name} cannot be null (it takes a value of type {kind})")
    try:
        if kind.startswith(("float", "int")) and isinstance(value, bool):
            raise ValueError
        if kind.startswith("float"):
            return float(value)
        if kind == "int | str" and isinstance(value, str):
            return value  # a word the key also takes (iters: auto), checked by validate
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("str") and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # a number where text is also a number (cache_max_bytes: 1073741824 in YAML)
        if kind.startswith("str") and not isinstance(value, str):
            raise ValueError
        if kind.startswith("bool") and not isinstance(value, bool):
            raise ValueError
        if kind == "list" and not isinstance(value, list):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {kind}") from None
    return value


def _check_keys(keys, where: str) -> None:
    unknown = sorted(set(keys) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; valid keys: {', '.join(FIELDS)}")


def parse(argv: list[str] | None = None) -> TrainConfig:
    """``--config file.yaml`` and ``--key value`` (or ``--key=value``) overrides, later ones winning."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    values: dict[str, Any] = {}
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and FIELDS.get(key, None) is not None
                                      and FIELDS[key].type in ("bool", bool)):
                val = "true"  # a bare boolean flag
            else:
                i += 1
                val = argv[i]
        pairs.append((key, val))
        i += 1
    config_files = [v for k, v in pairs if k == "config"]
    for path in config_files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{at}: {getattr(err, 'problem', err)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        _check_keys(loaded, path)
        values.update({k: _coerce(k, v) for k, v in loaded.items()})
    cli = {k: v for k, v in pairs if k != "config"}
    _check_keys(cli, "the command line")
    values.update({k: _coerce(k, v) for k, v in cli.items()})
    if values.get("preset") is not None:  # the preset fills what was not given explicitly
        from ..presets import PRESETS

        if values["preset"] not in PRESETS:
            raise ConfigError(f"preset={values['preset']!r}: choose one of {', '.join(PRESETS)} (or leave it unset)")
        for key, value in PRESETS[values["preset"]].recipe_values().items():
            values.setdefault(key, _coerce(key, value))
    cfg = TrainConfig(**values)
    validate(cfg)
    tiny = cfg.model == "builtin:tiny-llama"
    for key in ("tiny_hidden_size", "tiny_layers"):  # never ignored silently
        if key in values and not tiny:
            raise ConfigError(f"{key} applies only to --model builtin:tiny-llama (this run's model is {cfg.model}): "
                              f"add --model builtin:tiny-llama or drop {key}")
    # the generated corpus is the data of builtin:generated and what builtin:tiny-llama's tokenizer is trained on
    if "corpus_lines" in values and cfg.dataset != "builtin:generated" and not (tiny and cfg.tokenizer is None):
        raise ConfigError(f"corpus_lines applies only to --dataset builtin:generated or --model builtin:tiny-llama "
                          f"(this run: {cfg.model} on {cfg.dataset}): drop corpus_lines")
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every check that needs nothing but the values (``optim`` is checked against the registry in
    :func:`psilora_ds.recipe.optimizers.check_optim`, the engine's settings by its backend,
    :func:`psilora_ds.recipe.backends.choose_backend`)."""
    if cfg.lr_scheduler not in ("cosine", "linear", "constant"):
        raise ConfigError(f"lr_scheduler={cfg.lr_scheduler!r}: choose cosine, linear or constant")
    try:
        parse_cache_budget(cfg.cache_max_bytes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if isinstance(cfg.iters, str) and cfg.iters != "auto":
        raise ConfigError(f"iters={cfg.iters!r}: give a number of inner iterations (0: Jacobi, cache-free) or auto")
    if cfg.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"dtype={cfg.dtype!r}: choose fp32, bf16 or fp16")
    if (cfg.prompt_field is None) != (cfg.response_field is None):
        raise ConfigError("set prompt_field and response_field together (or neither, to train on text_field)")
    for name, choices in (("model", BUILTIN_MODELS), ("dataset", BUILTIN_DATASETS)):
        value = getattr(cfg, name)
        if value.startswith(BUILTIN) and value not in choices:
            raise ConfigError(f"{name}={value}: the built-in ones are {', '.join(choices)} (or give a hub id or a path)")
    if not is_builtin(cfg.dataset) and not _looks_like_hub_id(cfg.dataset) and not os.path.exists(cfg.dataset):
        raise ConfigError(f"dataset file {cfg.dataset} does not exist (give a local .json/.jsonl/.parquet/.txt/.csv "
                          "file or a hub id owner/name)")
    if cfg.ds_config is not None and not os.path.isfile(cfg.ds_config):
        raise ConfigError(f"DeepSpeed config {cfg.ds_config} does not exist")
    for name in ("model", "tokenizer"):
        path = getattr(cfg, name)
        if path is not None and not is_builtin(path) and not _looks_like_hub_id(path) and not os.path.exists(path):
            raise ConfigError(f"{name}={path} does not exist (give a local directory saved with save_pretrained, "
                              "or a hub id owner/name)")
    if cfg.resume_from_checkpoint == "":
        raise ConfigError("resume_from_checkpoint is empty: give a checkpoints/step-N directory or \"latest\"")
    if cfg.clip_norm_probes < 0:
        raise ConfigError(f"clip_norm_probes must be >= 0 (0: exact norm), got {cfg.clip_norm_probes}")
    for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "max_seq_len", "lora_r",
                 "eval_every", "log_every", "corpus_lines", "tiny_layers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("save_every", "save_total_limit", "eval_batches", "warmup_steps", "max_grad_norm", "other_lr",
                 "max_skipped_steps", "gc_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    unknown = sorted({n.strip() for n in cfg.report_to.split(",")} - set(REPORT_TO) - {"", "none"})
    if unknown:
        raise ConfigError(f"report_to={cfg.report_to!r}: unknown logger(s) {unknown}; choose from "
                          f"{', '.join(REPORT_TO)} (comma-separated)")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"lr must be > 0 (a run at lr 0 trains nothing), got {cfg.lr}")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0 (the adapter scaling is lora_alpha / r), got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1) (0: no evaluation), got {cfg.eval_fraction}")
    if cfg.tiny_hidden_size < 8 or cfg.tiny_hidden_size % 8:
        raise ConfigError(f"tiny_hidden_size must be a multiple of 8 (4 heads of an even size), got "
                          f"{cfg.tiny_hidden_size}")
    for h in HYPERPARAMETERS.values():  # the methods' ranges (the optimizers check the same on their arguments)
        if h.name == "iters" and cfg.iters == "auto":
            continue  # (chosen when the optimizer is built: psilora_ds.recipe.optimizers.choose_iters)
        if per_method(h.name) and getattr(cfg, h.name) is None:
            continue  # (a method that does not take it: TrainConfig.__post_init__ fills it for those that do)
        if problem := h.problem(getattr(cfg, h.name)):
            raise ConfigError(problem)
    if cfg.bnb_4bit_compute_dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"bnb_4bit_compute_dtype={cfg.bnb_4bit_compute_dtype!r}: use bfloat16, float16 or float32")
    if not (cfg.target_modules == "all-linear" or (isinstance(cfg.target_modules, list) and cfg.target_modules
                                                  and all(isinstance(t, str) for t in cfg.target_modules))):
        raise ConfigError(f"target_modules must be \"all-linear\" or a list of module names like [q_proj, v_proj], "
                          f"got {cfg.target_modules!r}")


BUILTIN = "builtin:"
REPORT_TO = ("jsonl", "tensorboard", "wandb")  # metric loggers (psilora_ds.recipe.loggers)
BUILTIN_MODELS = ("builtin:stdlib-llama", "builtin:tiny-llama")
BUILTIN_DATASETS = ("builtin:python-reference", "builtin:gnu-manuals", "builtin:generated")


def is_builtin(name: str | None) -> bool:
    """A model or dataset that ships with the repository or is made by it (no download)."""
    return name is not None and name.startswith(BUILTIN)


def _looks_like_hub_id(name: str) -> bool:
    local_suffixes = (".json", ".jsonl", ".parquet", ".txt", ".csv")
    return not name.endswith(local_suffixes) and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def format_value(value: Any) -> str:
    """A value as it is written on the command line or in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and (not value or not value.isprintable() or value != value.strip()):
        return json.dumps(value)  # quoted, escapes shown: "{prompt}\n"
    return str(value)


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def help_text() -> str:
    lines = ["usage: [deepspeed|torchrun|python] launch/train.py [--config FILE.yaml] [--key value ...]", "",
             "keys (default; meaning):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name:28s} {format_value(field_default(f)):24s} {f.metadata['help']}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/CONFIG.md: ``python -m psilora_ds.recipe.config > docs/CONFIG.md`` regenerates it."""
    return ("# Configuration reference of launch/train.py\n\n"
            "One YAML file (`--config run.yaml`, keys as below) plus `--key value` overrides on the command line "
            "(later wins; YAML syntax for values: `1e-3`, `true`, `[q_proj, v_proj]`, `null`). An unknown key stops "
            "the run with one line listing the valid keys. `python launch/train.py --help` prints this table.\n\n"
            "```text\n" + help_text() + "\n```\n")


if __name__ == "__main__":
    print(reference_markdown(), end="")
