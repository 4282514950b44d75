"""A transformers Trainer run for the integration tests, under any launcher:

    [deepspeed --num_gpus N] python tests/hf_trainer_script.py OUT MODE [ZERO_STAGE]

MODE ``optimizers``: ``Trainer(optimizers=(ScaledPSILoRA, scheduler))`` (what the Trainer discards under
DeepSpeed); ``integration``: ``psilora_ds.hf.PSILoRATrainer``; ``resume``: see :func:`resume`. ZERO_STAGE: DeepSpeed ZeRO stage, or ``none``.
Rank 0 writes OUT/result.pt: the LoRA factors, steps taken, losses. Every row of the data is the same
sequence, so any data order and any number of ranks see the same gradient as one process.
"""

import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 5
LR = 0.05


class SameRow(torch.utils.data.Dataset):
    def __init__(self, n=64, t=12, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.row = torch.randint(0, vocab, (t,), generator=g)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": self.row, "labels": self.row}


def peft_model():
    from peft import LoraConfig, get_peft_model

    from tests.models import tiny_llama

    model = get_peft_model(tiny_llama(seed=4), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B so that every factor moves from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return model


def settings():
    """PSILORA_ITERS=0 in the environment: Jacobi steps, which are cache-free."""
    return dict(optim="scaled_psilora", lr=LR, iters=int(os.environ.get("PSILORA_ITERS", "2")), betas=(0.9, 0.99),
                damping=1e-6)


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def training_args(out, stage, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    learning_rate=LR, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, max_grad_norm=100.0, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                    deepspeed=ds_config(int(stage)) if stage != "none" else None)
    return TrainingArguments(**{**settings, **overrides})


def resume(out, stage):
    """Train STEPS steps saving at step 3; a fresh Trainer resumes from a copy of checkpoint-3. Rank 0 writes
    both runs' factors to OUT/resume.pt."""
    import shutil

    import torch.distributed as dist

    from psilora_ds.hf import PSILoRATrainer

    states = {}
    for name in ("straight", "resumed"):
        run_dir = os.path.join(out, name)
        if name == "resumed" and int(os.environ.get("RANK", "0")) == 0:
            shutil.copytree(os.path.join(out, "straight", "checkpoint-3"), os.path.join(run_dir, "checkpoint-3"))
        if dist.is_initialized():
            dist.barrier()
        model = peft_model()
        args = training_args(run_dir, stage, save_strategy="steps", save_steps=3, lr_scheduler_type="cosine",
                             warmup_steps=1, max_grad_norm=0.5)
        trainer = PSILoRATrainer(model=model, args=args, train_dataset=SameRow(), psilora=settings())
        trainer.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-3") if name == "resumed" else None)
        from psilora_ds.recipe.engines import TrainableParams

        states[name] = TrainableParams(model, trainer.psilora_optimizer).state()
        states[name + "_steps"] = trainer.psilora_optimizer.steps_taken
    if int(os.environ.get("RANK", "0")) == 0:
        # what the engine's own checkpoint holds of the model (transformers saves a peft model's without the frozen base)
        import glob

        files = glob.glob(os.path.join(out, "straight", "checkpoint-3", "global_step*", "mp_rank_00_model_states.pt"))
        states["checkpoint_module_keys"] = [sorted(torch.load(f, weights_only=False)["module"]) for f in files]
        states["parameters"] = {n: p.requires_grad for n, p in model.named_parameters()}
        torch.save(states, os.path.join(out, "resume.pt"))


def main(out, mode, stage):
    from transformers import Trainer

    from psilora_ds.hf import PSILoRATrainer, build_lora_optimizer

    if mode == "resume":
        return resume(out, stage)
    model = peft_model()
    args = training_args(out, stage)
    if mode == "optimizers":
        from transformers import get_constant_schedule

        opt = build_lora_optimizer(model, **{k: v for k, v in settings().items()})
        trainer = Trainer(model=model, args=args, train_dataset=SameRow(), optimizers=(opt, get_constant_schedule(opt)))
    else:
        trainer = PSILoRATrainer(model=model, args=args, train_dataset=SameRow(), psilora=settings())
    trainer.train()
    opt = opt if mode == "optimizers" else trainer.psilora_optimizer
    from psilora_ds.recipe.engines import TrainableParams

    params = TrainableParams(model, opt)
    state = params.state()  # full fp32 factors, a collective under ZeRO
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        torch.save({"state": state, "steps_taken": opt.steps_taken, "max_grad_norm": opt.max_grad_norm,
                    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                    "distributor": type(opt.distributor).__name__}, os.path.join(out, "result.pt"))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    main(argv[0], argv[1], argv[2] if len(argv) > 2 else "none")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # no interpreter teardown: DeepSpeed engines destroyed there intermittently abort (SIGABRT) a finished run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
