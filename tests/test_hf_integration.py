"""transformers' Trainer with psilora_ds.hf: the same factors as a plain loop (one process, DeepSpeed
ZeRO-2 and ZeRO-3 on 2 ranks), resume from a Trainer checkpoint, and no silent fallback: when another
optimizer is stepped in PSI-LoRA's place (the Trainer under DeepSpeed discards optimizers=), the capture
guard stops the run with one clear error."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from psilora_ds import PSILoRA, StepNotCalledError

from . import hf_trainer_script as script
from .distributed import launcher_env
from .models import lora_two_layer_net
from .recipe_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "hf_trainer_script.py")


def test_guard_stops_a_run_whose_step_never_comes():
    x, t = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for accumulation, limit in ((None, 8), (3, 6)):
        model = lora_two_layer_net()
        opt = PSILoRA(model, 0.1, accumulation_steps=accumulation)
        other = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(limit):  # two steps' worth: still fine
            F.mse_loss(model(x), t).backward()
            other.step()
        with pytest.raises(StepNotCalledError, match="without its step\\(\\) running.*PSILoRATrainer"):
            F.mse_loss(model(x), t).backward()
    # stepping resets the count, and the largest accumulation seen raises the bound
    model = lora_two_layer_net()
    opt = PSILoRA(model, 0.1)
    for micro_batches in (6, 12, 12):
        for _ in range(micro_batches):
            F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    assert opt.capture.max_pending_microbatches == 24


def manual_run(steps=script.STEPS, micro=2, accumulation=2):
    """The Trainer's run done by hand in one process: the same model, optimizer and (identical) rows."""
    model = script.peft_model()
    settings = dict(script.settings())
    settings.pop("optim")
    from psilora_ds import ScaledPSILoRA

    opt = ScaledPSILoRA(model, max_grad_norm=100.0, **settings)
    row = script.SameRow()[0]["input_ids"]
    batch = row.repeat(micro, 1)
    for _ in range(steps):
        for _ in range(accumulation):
            (model(input_ids=batch, labels=batch).loss / accumulation).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_factors(result, reference):
    state = result["state"]
    assert set(state) == set(reference)
    for name, value in reference.items():
        err = float((state[name] - value).norm() / value.norm().clamp_min(1e-30))
        assert err <= 1e-5, (name, err)


def test_trainer_integration_equals_a_plain_loop(tmp_path):
    script.main(str(tmp_path), "integration", "none")
    result = torch.load(tmp_path / "result.pt")
    assert result["steps_taken"] == script.STEPS and result["max_grad_norm"] == 100.0
    assert_same_factors(result, manual_run())


def test_trainer_checkpoint_resume_continues_identically(tmp_path):
    from transformers import TrainingArguments

    from psilora_ds.hf import PSILoRATrainer

    def trainer(out, steps):
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=script.LR, lr_scheduler_type="cosine",
                                 warmup_steps=1, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True,
                                 max_grad_norm=0.5, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        return PSILoRATrainer(model=script.peft_model(), args=args, train_dataset=script.SameRow(),
                              psilora=script.settings())

    straight = trainer(tmp_path / "a", 6)
    straight.train()
    resumed = trainer(tmp_path / "b", 6)
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert resumed.psilora_optimizer.steps_taken == 6 and straight.psilora_optimizer.steps_taken == 6
    for la, lb in zip(straight.psilora_optimizer.layers, resumed.psilora_optimizer.layers):
        assert torch.equal(la.A, lb.A) and torch.equal(la.B, lb.B), la.name
    assert resumed.psilora_optimizer.lora_group["lr"] == straight.psilora_optimizer.lora_group["lr"]


def launch(tmp_path, ranks, mode, stage, port, **env):
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), SCRIPT,
           str(tmp_path), mode, str(stage)]
    return subprocess.run(cmd, cwd=ROOT, env=launcher_env(**env), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_trainer_under_deepspeed_with_discarded_optimizers_stops_with_the_guard(tmp_path):
    """The measured scenario: Trainer(optimizers=(ScaledPSILoRA, scheduler)) under DeepSpeed ZeRO-2 trained
    with the Trainer's own AdamW while PSI-LoRA's hooks kept capturing. Now it stops, naming the fix."""
    proc = launch(tmp_path, 1, "optimizers", 2, 29621)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "StepNotCalledError" in out and "psilora_ds.hf.PSILoRATrainer" in out, out[-3000:]
    assert not os.path.exists(tmp_path / "result.pt")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_trainer_integration_under_deepspeed_two_ranks_equals_one_process(tmp_path, stage):
    proc = launch(tmp_path, 2, "integration", stage, 29631 + stage)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["distributor"] == "DeepSpeedDistributor" and result["steps_taken"] == script.STEPS
    assert result["max_grad_norm"] == 100.0  # the Trainer's max_grad_norm, not the engine's clipping
    assert_same_factors(result, manual_run())


def test_the_trainer_example_runs():
    proc = run_script([sys.executable, os.path.join(ROOT, "examples", "hf_trainer.py"), "--steps", "4"], cwd=ROOT,
                      env=launcher_env(), timeout=300)
    assert proc.returncode == 0 and "ScaledPSILoRA: 4 steps" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_trainer_integration_under_torchrun_ddp_equals_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29661", SCRIPT,
           str(tmp_path), "integration", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["distributor"] == "DDPDistributor" and result["steps_taken"] == script.STEPS
    assert_same_factors(result, manual_run())


def test_trl_sft_trainer_with_peft_config_trains_with_psilora():
    """TRL's SFTTrainer wraps the model with peft_config itself; psilora_trainer(SFTTrainer) optimizes it."""
    pytest.importorskip("trl")
    proc = run_script([sys.executable, os.path.join(ROOT, "examples", "trl_sft.py"), "--steps", "10"], cwd=ROOT,
                      env=launcher_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ScaledPSILoRA on"))
    assert "10 steps" in line and " 0 LoRA layers" not in line, line
    first, last = (float(v) for v in line.split("loss ")[1].split(" -> "))
    assert last < first, line


@pytest.mark.slow
@pytest.mark.parametrize("iters", [2, 0])
def test_trainer_deepspeed_checkpoint_resume_continues_identically(tmp_path, iters):
    """Trainer + the integration under DeepSpeed ZeRO-2 on 2 ranks: resuming from checkpoint-3 (the engine's own
    checkpoint, PSI-LoRA's layer-sharded state inside it) ends with the same factors as the straight run; also
    with cache-free Jacobi steps (iters=0), whose factor copy must follow what the engine restores."""
    proc = launch(tmp_path, 2, "resume", 2, 29641 + iters, PSILORA_ITERS=str(iters))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    states = torch.load(tmp_path / "resume.pt")
    assert states["straight_steps"] == states["resumed_steps"] == script.STEPS  # steps_taken is in the state too
    for name, value in states["straight"].items():
        assert torch.equal(states["resumed"][name], value), name
    # the checkpoint carries the trainable parameters, never the frozen base
    (keys,) = states["checkpoint_module_keys"]
    frozen = {n for n, trainable in states["parameters"].items() if not trainable}
    trainable = {n for n, t in states["parameters"].items() if t}
    assert frozen and not frozen & set(keys), sorted(frozen & set(keys))[:5]
    assert trainable <= set(keys), sorted(trainable - set(keys))[:5]


def test_trainer_fp16_without_deepspeed_is_refused(tmp_path):
    """fp16 through the Trainer without DeepSpeed means torch.amp's GradScaler through accelerate, on GPUs only, so
    untested here: refused with one message naming the ways that work (a plain loop's GradScaler: test_amp_scaler)."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from psilora_ds.hf import PSILoRATrainer

    from .models import tiny_llama
    from .test_hf_trainer import RepeatedText

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, fp16=True, save_strategy="no")
    with pytest.raises(ValueError, match="fp16=True without DeepSpeed.*bf16=True"):
        PSILoRATrainer(model=model, args=args, train_dataset=RepeatedText(), psilora=dict(optim="scaled_psilora"))
