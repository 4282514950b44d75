"""PSI-LoRA fine-tuning of a causal LM: the recipe, read top to bottom, over psilora_ds.recipe.

    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero2.json [--config run.yaml] [--key value ...]
    torchrun --nproc_per_node 2 launch/train.py [...]        # DDP (or DeepSpeed with --ds_config)
    torchrun --nproc_per_node 2 launch/train.py --fsdp true [--dtype bf16] [...]   # torch FSDP2
    python launch/train.py [...]                             # one process

With no --model/--dataset it runs the offline default: LoRA fine-tuning of a small LLaMA pretrained on
Python's standard-library source (shipped: builtin:stdlib-llama) on the English language reference that
ships with Python (builtin:python-reference), evaluated on held-out topics. `--help` lists every key.
Outputs in --output_dir: metrics.jsonl, loss.png, adapter/ (peft), checkpoints/step-N/.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch
from huggingface_hub.utils import logging as hub_logging
from tqdm import tqdm

from psilora_ds.recipe import checkpoint
from psilora_ds.recipe.backends import choose_backend
from psilora_ds.recipe.config import ConfigError, is_builtin, parse
from psilora_ds.recipe.data import build_datasets, check_sizes, micro_batches
from psilora_ds.recipe.faults import fault_requested
from psilora_ds.recipe.garbage import StepGarbageCollection
from psilora_ds.recipe.loggers import build_loggers, report_to
from psilora_ds.recipe.loop import DivergenceStop, evaluate, inject_overflow, optimizer_metrics, train_step
from psilora_ds.recipe.modeling import DTYPES, build_model, build_tokenizer, offline_base
from psilora_ds.recipe.optimizers import build_optimizer, build_scheduler, check_optim
from psilora_ds.recipe.plot import plot_run
from psilora_ds.recipe.preemption import StopRequest, exit_code, signal_name
from psilora_ds.recipe.ranks import exit_with_error, finish, rank0_first, setup_distributed
from psilora_ds.recipe.resume import (apply_hyperparameters, check_resume, config_record, group_hyperparameters,
                                      restore_schedule, run_identity)
from psilora_ds.recipe.run_lock import RunLock, check_fresh_start
from psilora_ds.recipe.runlog import MetricsLog, make_output_dir, save_outputs, summary_line

logger = logging.getLogger("psilora_ds.train")


def main(argv: list[str] | None = None) -> int:
    # ---- configuration and processes -------------------------------------------------------------
    cfg = parse(argv)
    check_optim(cfg)
    backend = choose_backend(cfg)  # plain PyTorch / DDP, DeepSpeed or FSDP2: the one place the engine is chosen
    rank, world, device = setup_distributed(backend.uses_deepspeed_launcher)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    hub_logging.set_verbosity_error()  # its retry warnings (a hub id without network: 40 lines) before our one line
    make_output_dir(cfg.output_dir)
    if rank == 0:
        RunLock(cfg.output_dir).acquire()  # one run per output_dir; released when this process ends
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    resume = checkpoint.resolve_resume(cfg.resume_from_checkpoint, ckpt_root)  # the newest that verifies
    if rank == 0:
        if resume is None:
            check_fresh_start(ckpt_root, cfg.overwrite_output_dir)  # never mix with another run's checkpoints
        checkpoint.remove_leftovers(ckpt_root)  # what a killed save or rotation left behind

    # ---- data, model, optimizer, engine (rank 0 fills the caches first) --------------------------
    tokenizer = rank0_first(rank, lambda: build_tokenizer(cfg))
    train_ds, eval_ds = rank0_first(rank, lambda: build_datasets(cfg, tokenizer))
    check_sizes(cfg, train_ds, eval_ds, world)
    backend.configure(cfg, world)
    model_args = backend.model_arguments()
    if backend.builds_model_partitioned(cfg):  # zero.Init partitions as it builds: all ranks at once
        if cfg.model == "builtin:tiny-llama":
            rank0_first(rank, lambda: offline_base(cfg, tokenizer))
        model = build_model(cfg, tokenizer, device, DTYPES[cfg.dtype], **model_args)
        logger.info("ZeRO-3: base built partitioned from birth (deepspeed.zero.Init), 1/%d of it per rank", world)
    else:
        model = rank0_first(rank, lambda: build_model(cfg, tokenizer, device, DTYPES[cfg.dtype],
                                                      shards_weights=model_args["shards_weights"]))
    torch.manual_seed(cfg.seed + 1000 * rank)  # dropout differs across ranks, is reproducible per rank
    if (done := backend.prepare_model(model, cfg)) is not None:  # FSDP2: shard before the optimizer sees it
        logger.info("%s", done)
    optimizer = build_optimizer(cfg, model, backend.distributor())
    engine, scheduler, params = backend.build(cfg, model, optimizer, build_scheduler(cfg, optimizer), world)
    engine_name = backend.name
    logger.info("%s on %d rank(s) (%s), %d trainable parameters, %d train / %d eval sequences of %d tokens",
                cfg.optim, world, engine_name, params.numel(),
                len(train_ds), len(eval_ds) if eval_ds is not None else 0, cfg.max_seq_len)

    # ---- resume, or start a fresh curve ----------------------------------------------------------
    metrics = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"), enabled=rank == 0)
    identity, run_config = run_identity(cfg, model, params.shapes()), config_record(cfg)  # (what saves record)
    step, skipped_before, run_id = 0, 0, uuid.uuid4().hex
    if resume is not None:
        saved = checkpoint.read_trainer_state(resume)
        changes = check_resume(resume, saved.step, saved.identity, saved.config, cfg, identity)
        hyper, schedule = group_hyperparameters(optimizer), scheduler.state_dict()  # this run's: they win
        saved = checkpoint.load(resume, optim=cfg.optim, params=params, optimizer=optimizer, scheduler=scheduler,
                                device=device, sharded_model=backend.checkpoint_arguments(model)["sharded_model"])
        apply_hyperparameters(optimizer, hyper)
        next_lr = restore_schedule(scheduler, optimizer, schedule)
        step, skipped_before, run_id = saved.step, saved.engine_skipped_steps, saved.run_id or run_id
        metrics.truncate_after(step)
        logger.info("resumed from %s at step %d (saved by %d ranks); next lr %.3g", resume, step, saved.world_size,
                    next_lr)
        for change in changes:
            logger.info("resume applies a changed setting: %s", change)
    else:
        metrics.restart()
    loggers = [metrics]  # (+ TensorBoard / W&B on rank 0, --report_to)
    if rank == 0:
        loggers += build_loggers(report_to(cfg.report_to), cfg.output_dir, run_id=run_id, config=run_config,
                                 resumed_at=None if resume is None else step)

    def log(record: dict) -> None:
        for logger_ in loggers:
            logger_.log(record)

    if resume is None and eval_ds is not None:  # where the base starts: the curve's step 0
        log({"step": 0, **evaluate(engine, model, eval_ds, cfg, rank, world, tokenizer.pad_token_id, device)})

    # ---- train -----------------------------------------------------------------------------------
    stream = micro_batches(train_ds, cfg, rank, world, tokenizer.pad_token_id, start=step * cfg.gradient_accumulation_steps)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    stop = StopRequest()
    stop.install()  # SIGTERM / SIGUSR1 / Ctrl-C: finish the step, save, exit non-zero
    divergence = DivergenceStop(optimizer, cfg.max_skipped_steps)  # steps skipped in a row: stop with one line
    collector = StepGarbageCollection(cfg.gc_every)  # every rank at the same steps, not at random ones
    collector.start()
    started, last_saved = time.perf_counter(), None
    outcome = 1  # the run's exit code as the loggers are told it: an error that leaves the loop is a failure
    try:  # (the bar is closed on every way out: an error line must not share the bar's line)
        while step < cfg.max_steps:
            lr = scheduler.get_last_lr()[0]  # the lr this step uses
            step += 1
            if fault_requested("nan", step):
                inject_overflow(optimizer)
            record = {**train_step(engine, stream, cfg, step, device, world), "lr": lr,
                      **optimizer_metrics(optimizer)}
            if backend.counts_skipped_steps:
                record["engine_skipped_steps"] = skipped_before + engine.skipped_steps
            if eval_ds is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record.update(evaluate(engine, model, eval_ds, cfg, rank, world, tokenizer.pad_token_id, device))
            if step % cfg.log_every == 0 or "eval_loss" in record:
                log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            divergence.after_step(step, ckpt_root)
            collector.after_step(step)
            signum = stop.agreed()
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or signum:
                trainer = checkpoint.TrainerState(step=step, world_size=world, optim=cfg.optim, engine=engine_name,
                                                  engine_skipped_steps=record.get("engine_skipped_steps", 0),
                                                  run_id=run_id, identity=identity, config=run_config)
                last_saved = checkpoint.save(ckpt_root, trainer, params=params, optimizer=optimizer,
                                             scheduler=scheduler, keep=cfg.save_total_limit,
                                             **backend.checkpoint_arguments(model))
            if signum:
                bar.close()
                if rank == 0:
                    print(f"error: stopped by {signal_name(signum)} after step {step}: checkpoint {last_saved} "
                          "written; resume with --resume_from_checkpoint latest", file=sys.stderr, flush=True)
                outcome = exit_code(signum)
                return outcome
        bar.close()

        # ---- outputs (before the loggers close: a run whose outputs fail is not reported finished) ---------
        state = params.state()  # a collective under ZeRO: every rank
        if rank == 0:
            save_outputs(cfg.output_dir, model, tokenizer, state, merge=cfg.merge_weights and not cfg.load_in_4bit,
                         base_name=cfg.model if is_builtin(cfg.model) else None)
            logger.info("loss curve: %s", plot_run(cfg.output_dir))
            print(summary_line(cfg.output_dir, time.perf_counter() - started), flush=True)
        outcome = 0
        return outcome
    except ConfigError:
        outcome = 2  # (the one error line and exit code 2 of exit_with_error)
        raise
    finally:
        bar.close()
        stop.uninstall()
        collector.close()
        for logger_ in loggers:
            logger_.close(outcome)


if __name__ == "__main__":
    try:
        code = main()
    except ConfigError as err:
        exit_with_error(str(err))
    finish(code)
