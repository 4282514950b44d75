"""Tokenizer and model for the recipe: the offline tiny LLaMA or any HF causal LM, optionally
4-bit (QLoRA, bitsandbytes), with peft LoRA adapters."""

from __future__ import annotations

import logging
import os

import torch

from ..qlora import keep_training_kernels
from .config import ConfigError, TrainConfig
from .corpus import generate_corpus, train_tokenizer
from .data import corpus_path, one_line

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}


STDLIB_LLAMA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "stdlib-llama")


def builtin_base() -> str:
    """The directory of ``builtin:stdlib-llama`` (weights, tokenizer, ``pretrain.json``)."""
    if not os.path.isfile(os.path.join(STDLIB_LLAMA, "config.json")):
        raise ConfigError(f"the built-in base {STDLIB_LLAMA} is missing: rebuild it with python launch/pretrain_base.py "
                          "(about 10 minutes on 2 CPU cores)")
    return STDLIB_LLAMA


def build_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    if cfg.model == "builtin:tiny-llama" and cfg.tokenizer is None:
        corpus = generate_corpus(corpus_path(cfg), cfg.corpus_lines, cfg.seed)
        return train_tokenizer(corpus, os.path.join(cfg.cache_dir, f"tokenizer-bpe512-{cfg.corpus_lines}-seed{cfg.seed}"))
    name = cfg.tokenizer or saved_base(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer of {name}: {one_line(err)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama(cfg: TrainConfig, vocab_size: int):
    """The offline LLaMA built whole from a config (the recipe saves it once: :func:`offline_base`)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(llama_config(cfg.tiny_hidden_size, cfg.tiny_layers, vocab_size, max(256, cfg.max_seq_len)))


def llama_config(hidden: int, layers: int, vocab_size: int, max_positions: int):
    """The recipe's small LLaMA shape (4 query heads, 2 key/value heads, MLP 2 x hidden, untied head): the
    offline tiny LLaMA and the built-in pretrained base (:mod:`psilora_ds.recipe.pretrain`)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_positions, tie_word_embeddings=False)


def offline_base(cfg: TrainConfig, tokenizer) -> str:
    """The offline LLaMA saved once under ``cache_dir`` (call it on rank 0 first): every engine then loads the same
    weights with ``from_pretrained``, whether it builds them whole, in 4 bit or partitioned from birth (ZeRO-3,
    where building from a config would draw other initial weights)."""
    max_pos = max(256, cfg.max_seq_len)
    path = os.path.join(cfg.cache_dir, f"tiny-llama-{cfg.tiny_hidden_size}x{cfg.tiny_layers}-v{len(tokenizer)}"
                                       f"-pos{max_pos}-seed{cfg.seed}")
    if not os.path.exists(os.path.join(path, "config.json")):
        tmp = f"{path}.tmp-{os.getpid()}"
        tiny_llama(cfg, len(tokenizer)).save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a model
        except OSError:  # another process got there first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def saved_base(cfg: TrainConfig) -> str:
    """The hub id or path of a base that exists already (with its tokenizer): the one given, or the shipped one."""
    return builtin_base() if cfg.model == "builtin:stdlib-llama" else cfg.model


def base_path(cfg: TrainConfig, tokenizer) -> str:
    """Where ``from_pretrained`` finds the base: :func:`saved_base`, or the tiny LLaMA saved once whole (before
    ``zero.Init`` is on)."""
    return offline_base(cfg, tokenizer) if cfg.model == "builtin:tiny-llama" else saved_base(cfg)


# transformers reads the live HfDeepSpeedConfig (a weak global) while it builds or loads a model, and so does peft:
# the recipe's ZeRO-3 config is kept here for the process's lifetime
_ZERO3_CONFIG = None


def check_bitsandbytes(device: torch.device) -> None:
    """Raise one line when bitsandbytes cannot run a 4-bit layer forward and backward on ``device``."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as err:  # noqa: BLE001 - any failure means: not usable here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--load_in_4bit: bitsandbytes cannot run 4-bit layers on {device} ({first})") from None


def quantization_config(cfg: TrainConfig, engine_dtype: torch.dtype, shards_weights: bool):
    from transformers import BitsAndBytesConfig

    storage = engine_dtype if cfg.bnb_4bit_quant_storage == "auto" else DTYPES.get(cfg.bnb_4bit_quant_storage)
    if storage is None:
        raise ConfigError(f"bnb_4bit_quant_storage={cfg.bnb_4bit_quant_storage!r}: use auto, uint8, bfloat16, "
                          "float16 or float32")
    if shards_weights and storage != engine_dtype:  # the packed bytes are cast like any weight when gathered
        raise ConfigError(f"QLoRA under ZeRO-3 or FSDP2 needs bnb_4bit_quant_storage equal to the engine dtype "
                          f"({engine_dtype}) so the engine can shard the 4-bit weights: set it to auto")
    if cfg.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"bnb_4bit_quant_type={cfg.bnb_4bit_quant_type!r}: use nf4 or fp4")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype],
                              bnb_4bit_quant_storage=storage)


def load_pretrained(path: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained``; a path or id that does not give a causal LM is one line."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot load model {path}: {one_line(err)}") from None


def build_model(cfg: TrainConfig, tokenizer, device: torch.device, engine_dtype: torch.dtype = torch.float32,
                shards_weights: bool = False, zero3_config: dict | None = None):
    """The base model (fp32 masters, or 4-bit with ``load_in_4bit``) wrapped with peft LoRA;
    ``shards_weights``: the engine shards the weights (ZeRO-3, FSDP2). ``zero3_config``: the (filled) DeepSpeed
    config of a ZeRO-3 run whose base is built partitioned from birth (:meth:`~psilora_ds.recipe.backends.DeepSpeedBackend.builds_model_partitioned`), through
    transformers' public route (``HfDeepSpeedConfig`` alive during ``from_config`` / ``from_pretrained``): no
    rank ever holds the whole base. Every rank calls it together then. The LoRA factors are created after,
    unpartitioned (peft initializes them as usual); ``deepspeed.initialize`` partitions them."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ..optim.registry import METHODS
    from ..polar_adapter import register_polar

    global _ZERO3_CONFIG
    path = base_path(cfg, tokenizer)
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        _ZERO3_CONFIG = HfDeepSpeedConfig(zero3_config)
    if cfg.load_in_4bit:
        check_bitsandbytes(device)
        model = load_pretrained(path, quantization_config=quantization_config(cfg, engine_dtype, shards_weights),
                                device_map={"": device}, dtype=engine_dtype)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_training_kernels(model)  # evaluation between steps must not repack the 4-bit weights (CPU)
    else:
        model = load_pretrained(path, dtype=torch.float32)
    if cfg.gradient_checkpointing and not cfg.load_in_4bit:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = cfg.target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")
    if METHODS[cfg.optim].adapter == "polar":  # PoLAR's B S A adapters (psilora_ds.polar_adapter), 4-bit too
        register_polar(lora)
    torch.manual_seed(cfg.seed)  # the adapters' initialization, whatever building the base drew
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"target_modules={targets} match no layer of the model ({str(err).splitlines()[0][:80]}); "
                          f"linear layer names: {', '.join(linear)}") from None
    return model.to(device) if not cfg.load_in_4bit else model
