"""Full fine-tuning with AdamW, the ceiling of the quality map (issue 25): every weight of the base trained, on the
recipe's own data, schedule, clipping, evaluation and step loop (``psilora_ds.recipe``), so that its figures compare
with the LoRA runs' point for point. A bench measurement, not a recipe mode: the recipe's checkpoints and outputs are
LoRA-sized by design.

    python bench/full_finetune.py --model bench/bases/stdlib-256x6-v4096 --lr 1e-3 --max_steps 300 [recipe keys]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def dense_update_statistics(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """Medians over the decoder's linear layers (the ones LoRA's ``all-linear`` targets) of the learned update
    ``Delta W``: its Frobenius norm and stable rank ``||Delta W||_F^2 / ||Delta W||_2^2`` (as
    :func:`bench.common.adapter_statistics` for the adapters, here from the dense matrix)."""
    norms, stable = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name in before:
            s = torch.linalg.svdvals(module.weight.detach().double() - before[name])
            norms.append(float(s.square().sum().sqrt()))
            stable.append(float(s.square().sum() / s[0].square()) if s[0] > 0 else 0.0)
    return {"update_norm": statistics.median(norms), "stable_rank": statistics.median(stable)}


def full_finetune_run(argv: list[str]) -> dict:
    """One full fine-tuning run with the recipe's keys (``--model``, ``--dataset``, ``--lr``, ``--seed``,
    ``--max_steps``, ``--eval_every``, ...; ``--optim`` is AdamW on every weight): ``{"eval": {step: loss},
    "train_seconds": {step: s}, "train_last10", "update_norm", "stable_rank"}`` like
    :func:`bench.common.recipe_run`, or ``{"error": ...}`` for a run that diverged."""
    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.data import build_datasets, micro_batches
    from psilora_ds.recipe.engines import PlainEngine
    from psilora_ds.recipe.loop import evaluate, train_step
    from psilora_ds.recipe.modeling import base_path, build_tokenizer, load_pretrained
    from psilora_ds.recipe.optimizers import build_scheduler

    torch.set_num_threads(1)
    cfg = parse(argv)
    tokenizer = build_tokenizer(cfg)
    train_ds, eval_ds = build_datasets(cfg, tokenizer)
    model = load_pretrained(base_path(cfg, tokenizer), dtype=torch.float32)
    skip = {"lm_head"}
    before = {n: m.weight.detach().double().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n not in skip}
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(cfg, optimizer)
    engine = PlainEngine(model, optimizer, scheduler, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                         max_grad_norm=cfg.max_grad_norm, world_size=1)
    device = torch.device("cpu")
    pad = tokenizer.pad_token_id
    evals = {"0": evaluate(engine, model, eval_ds, cfg, 0, 1, pad, device)["eval_loss"]}
    seconds, losses, elapsed = {"0": 0.0}, [], 0.0
    stream = micro_batches(train_ds, cfg, 0, 1, pad)
    start = time.time()
    for step in range(1, cfg.max_steps + 1):
        record = train_step(engine, stream, cfg, step, device, 1)
        elapsed += record["step_time"]
        losses.append(record["loss"])
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return {"error": f"diverged at step {step}"}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            evals[str(step)] = evaluate(engine, model, eval_ds, cfg, 0, 1, pad, device)["eval_loss"]
            seconds[str(step)] = round(elapsed, 2)
    return {"eval": evals, "train_seconds": seconds, "train_last10": statistics.mean(losses[-10:]),
            "wall": round(time.time() - start, 1), **dense_update_statistics(before, model)}


if __name__ == "__main__":
    print(full_finetune_run(sys.argv[1:]))
