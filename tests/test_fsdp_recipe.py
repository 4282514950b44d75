"""The recipe on torch FSDP2 (``torchrun launch/train.py --fsdp true``, 2 CPU ranks, gloo): the same
LoRA factors as the DeepSpeed ZeRO-3 run and the one-process run; checkpoints through
torch.distributed.checkpoint that hold no frozen base and resume on 2 -> 2, 2 -> 1 and 1 -> 2 ranks;
QLoRA with the 4-bit base sharded."""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from .test_train_recipe import (ROOT, SMALL, assert_outputs, assert_same_curve, deepspeed_launcher, metrics, resume_copy,
                                run)

pytestmark = pytest.mark.slow

# No dropout and no clipping (several ranks sketch the clipping norm): every engine computes the same
# steps. 2 ranks x 4 sequences see the sequences one process sees in a micro-batch of 8.
EXACT = ["--lora_dropout", "0", "--max_grad_norm", "0", "--max_steps", "5", "--save_every", "3", "--eval_every", "5",
         "--warmup_steps", "0", "--lr", "5e-3", "--lora_r", "4"]


def torchrun(port, ranks=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]


def adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_adapter(a, b, rel=1e-5):
    fa, fb = adapter(a), adapter(b)
    assert sorted(fa) == sorted(fb) and fa
    worst = max((rel_err(fa[k], fb[k]), k) for k in fa if fb[k].norm() > 0)
    assert worst[0] <= rel, worst


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted runs: FSDP2 on 2 ranks (with gradient checkpointing) and on 1, ZeRO-3 on 2,
    one plain process."""
    tmp = tmp_path_factory.mktemp("fsdp_recipe")
    runs = {"fsdp2": tmp / "fsdp2", "fsdp1": tmp / "fsdp1", "zero3": tmp / "zero3", "plain": tmp / "plain"}
    procs = {
        "fsdp2": run([*EXACT, "--fsdp", "true", "--gradient_checkpointing", "true", "--output_dir", str(runs["fsdp2"])],
                     tmp, launcher=torchrun(29651)),
        "fsdp1": run([*EXACT, "--fsdp", "true", "--micro_batch_size", "8", "--output_dir", str(runs["fsdp1"])], tmp,
                     launcher=torchrun(29652, ranks=1)),
        "zero3": run([*EXACT, "--ds_config", os.path.join(ROOT, "ds_configs", "zero3.json"),
                      "--output_dir", str(runs["zero3"])], tmp, launcher=deepspeed_launcher(29653)),
        "plain": run([*EXACT, "--micro_batch_size", "8", "--output_dir", str(runs["plain"])], tmp),
    }
    return tmp, runs, procs


def test_fsdp2_run_equals_zero3_and_one_process(straight):
    _, runs, procs = straight
    assert "FSDP2: 2 decoder layers sharded" in procs["fsdp2"].stderr
    assert "on 2 rank(s) (fsdp2)" in procs["fsdp2"].stderr
    assert_outputs(runs["fsdp2"])
    for other in ("zero3", "plain", "fsdp1"):
        assert_same_adapter(runs["fsdp2"], runs[other])
        assert_same_curve(runs[other], runs["fsdp2"], 0)
    # the 5 steps moved the factors: equality is not two untouched initializations
    moved = adapter(runs["fsdp2"])
    assert all(t.norm() > 0 for k, t in moved.items() if "lora_B" in k)


def test_fsdp2_checkpoint_holds_trainables_and_optimizer_only(straight):
    """The DCP checkpoint's tensors are exactly the trainable parameters (fp32) and the optimizer
    state the ranks report; no frozen base tensor is in it."""
    tmp, runs, _ = straight
    sys.path.insert(0, ROOT)
    import torch.distributed.checkpoint as dcp

    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.modeling import build_model, build_tokenizer

    cfg = parse([*SMALL, *EXACT, "--cache_dir", str(tmp / "cache")])
    model = build_model(cfg, build_tokenizer(cfg), torch.device("cpu"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    step5 = runs["fsdp2"] / "checkpoints" / "step-5"
    assert sorted(os.listdir(step5)) == ["dcp", "rank-0.pt", "rank-1.pt", "trainer_state.json"]
    saved = dcp.FileSystemReader(str(step5 / "dcp")).read_metadata().state_dict_metadata
    tensors = {k: v.size.numel() * 4 for k, v in saved.items() if hasattr(v, "size")}
    model_keys = {k.removeprefix("model.") for k in tensors if k.startswith("model.")}
    assert model_keys == set(trainable)  # the adapters, and nothing of the base
    last = metrics(runs["fsdp2"])[-1]
    assert 0 < last["state_bytes_rank_max"] < last["state_bytes_total"]  # each rank the state of its layers
    assert sum(tensors.values()) == 4 * sum(trainable.values()) + last["state_bytes_total"]


@pytest.mark.parametrize("ranks,source", [(2, "fsdp2"), (1, "fsdp2"), (2, "fsdp1")], ids=["2to2", "2to1", "1to2"])
def test_fsdp2_resume_continues_the_same_curve(straight, ranks, source):
    """From step 3 of a run on 2 (or 1) ranks, on 2 (or 1): the exact same curve and factors (the
    world size does not change the steps here: no dropout, no clipping, the same global batches)."""
    tmp, runs, _ = straight
    resumed = resume_copy(runs[source], tmp, "step-3", name=f"resumed-{source}-on-{ranks}")
    micro = ["--micro_batch_size", "8"] if ranks == 1 else []
    proc = run([*EXACT, "--fsdp", "true", *micro, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
               tmp, launcher=torchrun(29660 + ranks + 3 * (source == "fsdp1"), ranks=ranks))
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    if (ranks == 2) != (source == "fsdp2"):
        assert f"resuming on {ranks}" in proc.stderr
    assert_same_curve(runs[source], resumed, 3)
    assert_same_adapter(runs[source], resumed)


def test_qlora_4bit_base_sharded_under_fsdp2(tmp_path):
    """A bitsandbytes nf4 base with bnb_4bit_quant_storage = the compute dtype (bf16), sharded with the
    rest; trains, evaluates, checkpoints and resumes."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    args = ["--fsdp", "true", "--load_in_4bit", "true", "--dtype", "bf16", "--max_steps", "4", "--eval_every", "2",
            "--save_every", "2", "--gradient_checkpointing", "true"]
    run([*args, "--output_dir", str(out)], tmp_path, launcher=torchrun(29671))
    assert_outputs(out)
    resumed = resume_copy(out, tmp_path, "step-2")
    run([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path,
        launcher=torchrun(29672))
    assert_same_curve(out, resumed, 2, rel=1e-3)  # bf16 compute


def test_fsdp2_sigterm_on_one_rank_overflow_and_crafted_metadata(straight, tmp_path):
    """Under torchrun + FSDP2 (the DCP path): SIGTERM to rank 1 alone saves step 2 on both ranks and exits 143; the
    resume continues the uninterrupted curve; a crafted DCP ``.metadata`` never runs code (refused by name, skipped
    by latest); an update that overflows is undone on both ranks."""
    import pickle

    from .test_reliability import Payload, steps_of

    tmp, runs, _ = straight
    args = [*EXACT, "--fsdp", "true", "--gradient_checkpointing", "true"]
    cut = tmp_path / "cut"
    proc = run([*args, "--output_dir", str(cut)], tmp_path, launcher=torchrun(29675), check=False,
               extra_env={"PSILORA_DS_FAULT": "sigterm:2:1"})
    assert proc.returncode != 0 and "stopped by SIGTERM after step 2" in proc.stderr, proc.stderr[-3000:]
    assert steps_of(cut) == [2]
    run([*args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path, launcher=torchrun(29676))
    assert_same_curve(runs["fsdp2"], cut, 2)
    assert steps_of(cut) == [3, 5]

    marker = tmp_path / "marker"
    with open(cut / "checkpoints" / "step-5" / "dcp" / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)  # (its digest no longer matches either: both refusals name the file)
    proc = run([*args, "--max_steps", "7", "--output_dir", str(cut), "--resume_from_checkpoint",
                str(cut / "checkpoints" / "step-5")], tmp_path, launcher=torchrun(29677), check=False)
    assert proc.returncode != 0 and "step-5" in proc.stderr and not marker.exists(), proc.stderr[-3000:]
    proc = run([*args, "--max_steps", "7", "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path,
               launcher=torchrun(29678))
    assert not marker.exists() and "resumed from " + str(cut / "checkpoints" / "step-3") in proc.stderr

    nan = tmp_path / "nan"
    run([*args, "--output_dir", str(nan)], tmp_path, launcher=torchrun(29679), extra_env={"PSILORA_DS_FAULT": "nan:2"})
    assert [r["skipped_steps"] for r in metrics(nan)][:3] == [0, 1, 1]


def test_fsdp2_adamw_baseline_skips_an_overflowing_update_and_resumes(tmp_path):
    """The torch baselines' non-finite guard on DTensor shards (each rank checks its shard, one all-reduce), and
    their DCP checkpoint resumes the same curve."""
    args = ["--optim", "adamw", "--fsdp", "true", "--max_steps", "4", "--save_every", "2", "--warmup_steps", "0"]
    nan = tmp_path / "nan"
    run([*args, "--output_dir", str(nan)], tmp_path, launcher=torchrun(29681), extra_env={"PSILORA_DS_FAULT": "nan:3"})
    assert [r["skipped_steps"] for r in metrics(nan)] == [0, 0, 1, 1]
    out = tmp_path / "straight"
    run([*args, "--output_dir", str(out)], tmp_path, launcher=torchrun(29682))
    resumed = resume_copy(out, tmp_path, "step-2")
    run([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path,
        launcher=torchrun(29683))
    assert_same_curve(out, resumed, 2)
