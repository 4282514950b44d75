"""A pretrained base with no download: the recipe's small LLaMA fully trained (AdamW, all weights) on the
Python standard library's source files (:mod:`psilora_ds.recipe.stdlib_text`), with a byte-level BPE
tokenizer trained on the same files.

``launch/pretrain_base.py`` runs it; its default output is the built-in base the offline default job
fine-tunes (``builtin:stdlib-llama``, shipped in ``psilora_ds/assets/stdlib-llama``, weights stored in
bf16, a few MB); ``bench/finetune_real.py`` builds a larger one under ``.cache/``. ``pretrain.json``
beside the weights records how it was made and its held-out losses on both domains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass

import torch

from .corpus import bpe_tokenizer
from .modeling import llama_config
from .stdlib_text import python_reference_documents, python_source_documents, stdlib_source_documents

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    hidden: int = 128
    layers: int = 4
    vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1500
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    save_dtype: str = "bfloat16"  # the weights as stored (loaded back in fp32 by the recipe)
    # modules: the built-in base's 72 modules (2.6 MB); stdlib: every standard-library source file but tests and the
    # held-out modules (11 MB), for larger bases, which overfit the modules (same held-out split)
    corpus: str = "modules"


CORPORA = {"modules": python_source_documents, "stdlib": stdlib_source_documents}


def text_sha256(docs: list[str]) -> str:
    """Identifies the text a held-out loss was measured on (the standard library differs between Pythons)."""
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()


def blocks(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """The documents tokenized, joined with eos and cut into ``[n, seq_len]`` blocks (the tail is dropped)."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def mean_loss(model, data: torch.Tensor, batch_size: int) -> float:
    """Token-mean next-token loss of ``model`` over every block of ``data``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size]
        total += float(model(input_ids=x, labels=x).loss) * x.numel()
        count += x.numel()
    model.train()
    return total / count


def pretrain_base(out_dir: str, cfg: PretrainConfig) -> dict:
    """Train the tokenizer and the model, save both to ``out_dir`` (atomically) with ``pretrain.json``, and
    return that record. Nothing is redone when ``out_dir`` already holds a finished base."""
    from transformers import LlamaForCausalLM

    record_path = os.path.join(out_dir, "pretrain.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    start = time.time()
    if cfg.corpus not in CORPORA:
        raise ValueError(f"corpus={cfg.corpus!r}: choose one of {', '.join(CORPORA)}")
    src_train, src_eval = CORPORA[cfg.corpus]()
    ref_train, ref_eval = python_reference_documents()
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    tokenizer = bpe_tokenizer(lambda: iter(src_train), tmp, cfg.vocab_size)
    train, held = blocks(src_train, tokenizer, cfg.seq_len), blocks(src_eval, tokenizer, cfg.seq_len)
    reference = blocks(ref_eval, tokenizer, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg.hidden, cfg.layers, len(tokenizer), max(1024, cfg.seq_len)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    order = random.Random(cfg.seed)
    perm: list[int] = []
    model.train()
    for step in range(cfg.steps):
        if len(perm) < cfg.batch_size:
            perm = list(range(len(train)))
            order.shuffle(perm)
        x = train[[perm.pop() for _ in range(cfg.batch_size)]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info("pretrain step %d/%d: loss %.3f (%.0f s)", step + 1, cfg.steps, float(loss.detach()),
                        time.time() - start)
    model.to(getattr(torch, cfg.save_dtype)).save_pretrained(tmp)
    # the losses of what is stored (the saved dtype, loaded back in fp32 as the recipe loads it)
    saved = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    record = {
        "config": asdict(cfg), "parameters": sum(p.numel() for p in saved.parameters()),
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len, "train_blocks": len(train),
        "eval_loss_python_source": mean_loss(saved, held, cfg.batch_size),
        "eval_loss_python_reference": mean_loss(saved, reference, cfg.batch_size),
        "source_files": len(src_train) + len(src_eval), "train_chars": sum(len(d) for d in src_train), "held_out_source_sha256": text_sha256(src_eval),
        "seconds": round(time.time() - start),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(record, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    os.replace(tmp, out_dir)
    return record
