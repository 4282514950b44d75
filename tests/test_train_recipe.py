"""End to end: launch/train.py on CPU, one process and under the real deepspeed launcher (2 ranks,
ZeRO 2); resume continues the same loss curve; the saved adapter reloads through peft with the same
eval loss; bad inputs fail with one line and a non-zero exit."""

import json
import math
import os
import shutil
import sys

import pytest
import torch

from psilora_ds.recipe.checkpoint_files import write_manifest

from .distributed import launcher_env
from .recipe_process import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
# the tests' small runs: a random tiny LLaMA on the generated corpus (the offline default is a real fine-tune)
SMALL_MODEL = ["--model", "builtin:tiny-llama", "--tiny_hidden_size", "64", "--tiny_layers", "2"]
SMALL_DATA = ["--dataset", "builtin:generated", "--corpus_lines", "1500"]
SMALL = [*SMALL_MODEL, *SMALL_DATA, "--max_seq_len", "64", "--micro_batch_size", "4", "--eval_batches", "2", "--lr", "1e-2"]


def small_for(args):
    """SMALL without the model (data) part when ``args`` name their own model (dataset)."""
    drop = set()
    if "--model" in args:
        drop |= {SMALL.index(x) + i for x in SMALL_MODEL[:1] for i in range(len(SMALL_MODEL))}
    if "--dataset" in args:
        drop |= {SMALL.index(x) + i for x in SMALL_DATA[:1] for i in range(len(SMALL_DATA))}
    return [a for i, a in enumerate(SMALL) if i not in drop]


def run(args, tmp_path, launcher=(sys.executable,), check=True, extra_env=None, fresh=False):
    """``launcher launch/train.py SMALL args``; one process runs forked from the tests' fork server (the same
    script, command line, environment, exit code and output, without the imports: tests/recipe_process.py), or in a
    fresh interpreter with ``fresh`` (what the server imported in advance cannot hide a missing import there)."""
    cmd = [*launcher, TRAIN, *small_for(args), "--cache_dir", str(tmp_path / "cache"), *args]
    proc = run_script(cmd, env=launcher_env(**(extra_env or {})), cwd=ROOT, timeout=600, fork=not fresh)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def all_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def metrics(run_dir):
    """The training steps' records (the step-0 record holds only the base's eval loss)."""
    return [r for r in all_records(run_dir) if r["step"] > 0]


def assert_outputs(out):
    for name in ("metrics.jsonl", "loss.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert os.path.exists(os.path.join(out, name)), name
    base = all_records(out)[0]  # the base before fine-tuning, evaluated first
    assert base["step"] == 0 and set(base) == {"step", "eval_loss", "eval_ppl"}
    records = metrics(out)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["eval_loss"] < base["eval_loss"]
    assert "eval_loss" in records[-1] and "eval_ppl" in records[-1]
    for key in ("lr", "tokens_per_s", "step_time", "grad_norm", "cache_bytes", "state_bytes_rank_max", "state_bytes_total", "skipped_steps"):
        assert key in records[0], key


def assert_same_curve(straight, resumed, from_step, rel=1e-5):
    a = {r["step"]: r for r in metrics(straight)}
    b = {r["step"]: r for r in metrics(resumed)}
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=rel), step
        if "eval_loss" in a[step]:
            assert b[step]["eval_loss"] == pytest.approx(a[step]["eval_loss"], rel=rel), step


def resume_copy(out, tmp_path, tag, name="resumed"):
    """A run directory holding the straight run's metrics and the checkpoint ``tag``."""
    resumed = tmp_path / name
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(os.path.join(out, "checkpoints", tag), resumed / "checkpoints" / tag)
    shutil.copy(os.path.join(out, "metrics.jsonl"), resumed / "metrics.jsonl")
    return resumed


def test_single_process_trains_saves_and_resumes_the_same_curve(tmp_path):
    out = tmp_path / "straight"
    args = ["--max_steps", "8", "--save_every", "4", "--eval_every", "4", "--save_total_limit", "2"]
    proc = run([*args, "--output_dir", str(out), "--merge_weights", "true"], tmp_path, fresh=True)
    assert_outputs(out)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("done: 8 steps; train loss ")]
    assert len(summary) == 1 and f"outputs in {out}" in summary[0], proc.stdout[-2000:]
    # saving the adapter looks nothing up on a hub (peft's embedding check would, and warns for a built-in base)
    assert "config file in builtin:" not in proc.stderr and "Unable to fetch remote file" not in proc.stderr
    assert "torch_dtype" not in proc.stderr  # transformers' deprecated keyword (a warning at every load) is not used
    with open(out / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "builtin:tiny-llama"  # not this machine's cache path
    assert os.path.exists(out / "merged" / "config.json")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-4", "step-8"]
    resumed = resume_copy(out, tmp_path, "step-4")
    run([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path)
    assert_same_curve(out, resumed, 4)

    # the adapter reloads through peft and gives the logged eval loss
    from peft import PeftModel

    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.data import build_datasets, micro_batches
    from psilora_ds.recipe.modeling import build_tokenizer, tiny_llama

    cfg = parse([*SMALL, "--cache_dir", str(tmp_path / "cache"), "--max_steps", "8"])
    tok = build_tokenizer(cfg)
    _, eval_ds = build_datasets(cfg, tok)
    model = PeftModel.from_pretrained(tiny_llama(cfg, len(tok)), str(out / "adapter")).eval()
    stream = micro_batches(eval_ds, cfg, 0, 1, tok.pad_token_id, shuffle=False)
    total = tokens = 0.0
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            b = next(stream)
            n = float((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            tokens += n
    assert total / tokens == pytest.approx(metrics(out)[-1]["eval_loss"], rel=1e-5)


def deepspeed_launcher(port, ranks=2):
    return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port)]


@pytest.mark.slow
def test_deepspeed_launcher_zero2_two_ranks_killed_while_saving_resumes_the_same_curve(tmp_path):
    """kill -9 of both ranks while checkpoint 4 is being written: "latest" is checkpoint 2, and the resumed
    run reproduces the uninterrupted run's later losses."""
    ds = deepspeed_launcher(29533)
    args = ["--ds_config", os.path.join(ROOT, "ds_configs", "zero2.json"), "--max_steps", "6", "--save_every", "2",
            "--eval_every", "3", "--warmup_steps", "0", "--save_total_limit", "3"]
    out = tmp_path / "straight"
    run([*args, "--output_dir", str(out)], tmp_path, launcher=ds)
    assert_outputs(out)
    cut = tmp_path / "killed"
    proc = run([*args, "--output_dir", str(cut)], tmp_path, launcher=ds, check=False,
               extra_env={"PSILORA_DS_FAULT": "checkpoint:4"})
    assert proc.returncode != 0 and not os.path.exists(cut / "adapter")  # the launcher reports its ranks' deaths
    assert sorted(os.listdir(cut / "checkpoints")) == [".step-4.partial", "step-2"]
    run([*args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path, launcher=ds)
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-2", "step-4", "step-6"]
    assert_same_curve(out, cut, 2)


def test_single_process_killed_mid_step_and_while_saving_resumes_the_same_curve(tmp_path):
    args = ["--max_steps", "6", "--save_every", "2", "--eval_every", "3", "--warmup_steps", "0",
            "--save_total_limit", "5"]
    out = tmp_path / "straight"
    run([*args, "--output_dir", str(out)], tmp_path)
    for fault, newest in (("step:5", "step-4"), ("checkpoint:4", "step-2"), ("checkpoint:2", None)):
        cut = tmp_path / fault.replace(":", "-")
        proc = run([*args, "--output_dir", str(cut)], tmp_path, check=False, extra_env={"PSILORA_DS_FAULT": fault})
        assert proc.returncode == -9, proc.stderr[-2000:]
        complete = [d for d in os.listdir(cut / "checkpoints") if not d.startswith(".")]
        assert sorted(complete)[-1:] == ([newest] if newest else [])
        if newest is None:  # killed while writing the first checkpoint: nothing to resume, one line says so
            proc = run([*args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path, check=False)
            assert proc.returncode == 2 and "holds no complete checkpoint" in proc.stderr
            continue
        run([*args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path)
        assert_same_curve(out, cut, int(newest.split("-")[1]))
        assert not [d for d in os.listdir(cut / "checkpoints") if d.startswith(".")]  # leftovers removed


def checkpoint_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


@pytest.mark.slow
def test_zero3_checkpoints_hold_no_base_and_move_between_world_sizes(tmp_path):
    """ZeRO-3 on 2 ranks: the log counts the real trainable parameters (partitioned tensors have numel 0),
    state bytes are summed over ranks, a checkpoint holds trainables + optimizer state only (within 2x),
    resumes the same curve on 2 ranks, and continues on 1 rank (same global batch) from the same state."""
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.modeling import build_model

    ds = deepspeed_launcher(29561)
    zero3 = os.path.join(ROOT, "ds_configs", "zero3.json")
    args = ["--max_steps", "6", "--save_every", "3", "--eval_every", "3", "--warmup_steps", "0", "--lora_r", "4",
            "--lr", "5e-3"]
    out = tmp_path / "zero3"
    proc = run([*args, "--ds_config", zero3, "--output_dir", str(out)], tmp_path, launcher=ds)
    assert_outputs(out)

    cfg = parse([*SMALL, *args, "--cache_dir", str(tmp_path / "cache")])
    from psilora_ds.recipe.modeling import build_tokenizer

    model = build_model(cfg, build_tokenizer(cfg), torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert f"{trainable} trainable parameters" in proc.stderr, proc.stderr[-3000:]
    last = metrics(out)[-1]
    assert 0 < last["state_bytes_rank_max"] < last["state_bytes_total"] <= 2 * last["state_bytes_rank_max"]
    size = checkpoint_bytes(out / "checkpoints" / "step-6")
    needed = 4 * trainable + last["state_bytes_total"]
    assert needed <= size <= 2 * needed, (size, needed)
    assert 4 * base > 2 * needed  # the bound would fail if the frozen base were in the checkpoint

    # 2 -> 2: the same curve
    same = resume_copy(out, tmp_path, "step-3", name="same")
    run([*args, "--ds_config", zero3, "--output_dir", str(same), "--resume_from_checkpoint", "latest"], tmp_path,
        launcher=ds)
    assert_same_curve(out, same, 3)

    # 2 -> 1 (micro-batch 8 on 1 rank = 2 x 4): resuming at the last step is refused (it would train nothing and
    # rewrite the adapter), and the loss curve continues from step 3
    one = resume_copy(out, tmp_path, "step-6", name="at6")
    proc = run([*args, "--ds_config", zero3, "--micro_batch_size", "8", "--output_dir", str(one),
                "--resume_from_checkpoint", "latest"], tmp_path, check=False)
    assert proc.returncode == 2 and "is at step 6 and max_steps is 6: nothing to train" in proc.stderr
    one = resume_copy(out, tmp_path, "step-3", name="at3")
    proc = run([*args, "--ds_config", zero3, "--micro_batch_size", "8", "--output_dir", str(one),
                "--resume_from_checkpoint", "latest"], tmp_path)
    assert "saved by 2 ranks, resuming on 1" in proc.stderr
    assert_continues(out, one, 3)


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_ranks(tmp_path):
    zero2 = os.path.join(ROOT, "ds_configs", "zero2.json")
    args = ["--ds_config", zero2, "--max_steps", "6", "--save_every", "3", "--eval_every", "3", "--warmup_steps", "0",
            "--lr", "5e-3"]
    out = tmp_path / "one"
    run([*args, "--micro_batch_size", "8", "--output_dir", str(out)], tmp_path)
    two = resume_copy(out, tmp_path, "step-3", name="two")
    proc = run([*args, "--output_dir", str(two), "--resume_from_checkpoint", "latest"], tmp_path,
               launcher=deepspeed_launcher(29577))
    assert "saved by 1 ranks, resuming on 2" in proc.stderr
    assert_continues(out, two, 3)


def assert_continues(straight, resumed, from_step, share=0.25):
    """Another world size sees other batches and dropout draws: the curve continues from the saved state.
    Each later eval loss (the same held-out sequences) is within ``share`` of the straight run's whole drop,
    which a restart from scratch would miss (at lr 5e-3 here: three steps from the base's 6.25 reach 6.05, the
    straight run 5.94 at step 6, a drop of 0.31)."""
    a = {r["step"]: r for r in metrics(straight)}
    b = {r["step"]: r for r in metrics(resumed)}
    assert sorted(a) == sorted(b)
    drop = a[1]["loss"] - a[max(a)]["eval_loss"]
    assert drop > 0.1, drop
    for step in a:
        if step <= from_step:
            assert b[step] == a[step]
        elif "eval_loss" in a[step]:
            assert abs(b[step]["eval_loss"] - a[step]["eval_loss"]) <= share * drop, step
    assert b[max(b)]["eval_loss"] < a[from_step]["eval_loss"]  # and it went on learning


def test_qlora_4bit_on_cpu_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    run(["--load_in_4bit", "--bnb_4bit_compute_dtype", "float32", "--max_steps", "4", "--eval_every", "4",
         "--save_every", "0", "--output_dir", str(out), "--target_modules", "[q_proj, v_proj]"], tmp_path)
    assert_outputs(out)


def bad_files(tmp):
    """The broken inputs of the table below, written into ``tmp``."""
    files = {
        "empty.jsonl": "",
        "broken.jsonl": '{"text": "a"}\nnot json at all\n',
        "qa.jsonl": '{"q": "a", "a": "b"}\n',
        "broken.json": '{ "zero_optimization": {"stage": 2}, ',
        "list.json": "[1, 2]",
        "clip.json": '{"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5}',
        "batch.json": '{"train_micro_batch_size_per_gpu": 2}',
        "optimizer.json": '{"optimizer": {"type": "Adam"}}',
        "offload.json": '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}',
        "stage5.json": '{"zero_optimization": {"stage": 5}}',
        "broken.yaml": "lr: [1e-3\n",
        "list.yaml": "- lr\n",
        "unknown.yaml": "learning_rate: 1e-3\n",
        "a_file": "not a directory",
        "null_text.jsonl": '{"text": "some words here"}\n{"text": null}\n',
        "no_text.jsonl": '{"text": "some words here"}\n{"other": "x"}\n',
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "latin1.jsonl").write_bytes('{"text": "caf\u00e9 au lait"}\n'.encode("latin-1"))
    (tmp / "not_a_model").mkdir()
    (tmp / "not_a_checkpoint").mkdir()
    (tmp / "fsdp_checkpoint").mkdir()
    write_manifest(str(tmp / "fsdp_checkpoint"), {"step": 3, "world_size": 2, "optim": "scaled_psilora",
                                                  "engine": "fsdp2"})


# (arguments with {tmp} for the folder of bad_files, words the single error line must contain)
BAD_INPUTS = [
    # paths that do not exist or are not what the key needs
    (["--model", "/nonexistent/model"], "model=/nonexistent/model does not exist"),
    (["--model", "{tmp}/not_a_model"], "cannot load the tokenizer of"),
    (["--model", "owner/no-such-model"], "cannot load the tokenizer of owner/no-such-model"),  # offline hub id
    (["--tokenizer", "/nonexistent/tok"], "tokenizer=/nonexistent/tok does not exist"),
    (["--dataset", "missing/file.jsonl"], "does not exist"),
    (["--dataset", "owner/no-such-dataset"], "cannot read dataset owner/no-such-dataset"),
    (["--ds_config", "/nonexistent.json"], "DeepSpeed config /nonexistent.json does not exist"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "does not exist"),
    (["--resume_from_checkpoint", "{tmp}/not_a_checkpoint"], "not a complete checkpoint"),
    (["--resume_from_checkpoint", "latest"], "holds no complete checkpoint"),
    (["--output_dir", "{tmp}/a_file/run"], "cannot be created"),
    # data that cannot be read or does not fit
    (["--dataset", "{tmp}/empty.jsonl"], "is empty"),
    (["--dataset", "{tmp}/broken.jsonl"], "cannot read dataset"),
    (["--dataset", "{tmp}/qa.jsonl"], "has no column 'text'"),
    (["--dataset", "{tmp}/qa.jsonl", "--prompt_field", "q"], "set prompt_field and response_field together"),
    (["--micro_batch_size", "64"], "too few for micro_batch_size=64"),
    # configuration files
    (["--config", "{tmp}/broken.yaml"], "is not valid YAML at line 2"),
    (["--config", "{tmp}/list.yaml"], "must hold a mapping"),
    (["--config", "{tmp}/unknown.yaml"], "unknown config key(s) ['learning_rate']"),
    (["--ds_config", "{tmp}/broken.json"], "is not valid JSON"),
    (["--ds_config", "{tmp}/list.json"], "must hold a JSON object"),
    (["--ds_config", "{tmp}/clip.json"], "gradient_clipping=0.5 disagrees with the recipe's max_grad_norm=1.0"),
    (["--ds_config", "{tmp}/batch.json"], "train_micro_batch_size_per_gpu=2 disagrees"),
    (["--ds_config", "{tmp}/optimizer.json"], "'optimizer' section"),
    (["--ds_config", "{tmp}/offload.json"], "offload_optimizer is not supported"),
    (["--ds_config", "{tmp}/stage5.json"], "zero_optimization.stage=5"),
    (["--ds_config", "ds_configs/zero2.json", "--dtype", "fp16"], "dtype=fp16 needs a GPU"),
    (["--dtype", "bf16"], "dtype=bf16 needs --ds_config"),
    # FSDP2 (the launcher's absence is checked last: the other rows run without one)
    (["--fsdp", "true", "--ds_config", "ds_configs/zero2.json"], "fsdp=true and ds_config are two engines"),
    (["--fsdp", "true", "--dtype", "fp16"], "dtype=fp16 under FSDP2 needs loss scaling"),
    (["--fsdp", "true", "--merge_weights", "true"], "merge_weights under FSDP2"),
    (["--fsdp", "true"], "fsdp=true needs a launcher: torchrun --nproc_per_node N"),
    (["--resume_from_checkpoint", "{tmp}/fsdp_checkpoint", "--max_steps", "5"], "written by the fsdp2 engine; resume it with --fsdp true"),
    (["--dataset", "{tmp}/null_text.jsonl"], "'text' is None, not text"),
    (["--dataset", "{tmp}/no_text.jsonl"], "'text' is None, not text"),
    (["--dataset", "{tmp}/latin1.jsonl"], "can't decode byte"),
    (["--lr", "0"], "lr must be > 0"),
    (["--report_to", "jsonl,mlflow"], "report_to='jsonl,mlflow': unknown logger(s) ['mlflow']"),
    (["--prox", "-1"], "prox must be >= 0"),
    # values
    (["--learning_rate", "1e-3"], "unknown config key"),
    (["--optim", "lion"], "choose one of"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--lr", "abc"], "lr='abc' is not a valid float"),
    (["--iters", "-2"], "iters must be >= 0"),
    (["--metric", "fisher"], "metric must be one of"),
    (["--betas", "[0.9]"], "betas must be two numbers"),
    (["--max_steps", "1.5"], "max_steps=1.5 is not a valid int"),
    (["--max_steps", "null"], "max_steps cannot be null"),
    (["--eval_every", "0"], "eval_every must be >= 1"),
    (["--warmup_steps", "-3"], "warmup_steps must be >= 0"),
    (["--lora_dropout", "1.5"], "lora_dropout must be in [0, 1)"),
    (["--momentum_prox", "1"], "momentum_prox must be in [0, 1)"),
    (["--cache_max_bytes", "lots"], "cache_max_bytes='lots': give bytes (8GiB, 512MiB, 1073741824), auto or null"),
    (["--lora_alpha", "0"], "lora_alpha must be > 0"),
    (["--model", "builtin:tiny-llama", "--tiny_hidden_size", "30"], "tiny_hidden_size must be a multiple of 8"),
    (["--model", "builtin:stdlib-llama", "--tiny_layers", "2"], "tiny_layers applies only to --model builtin:tiny"),
    (["--model", "builtin:stdlib-llama", "--dataset", "builtin:python-reference", "--corpus_lines", "9"],
     "corpus_lines applies only to --dataset builtin:generated or --model builtin:tiny-llama"),
    (["--target_modules", "5"], "target_modules must be"),
    (["--model", "builtin:gpt"], "the built-in ones are builtin:stdlib-llama, builtin:tiny-llama"),
    (["--optim", "riemannian", "--ds_config", "ds_configs/zero2.json"], "optim=riemannian runs only on plain PyTorch"),
    (["--target_modules", "[no_such_proj]"], "match no layer"),
    (["--load_in_4bit", "--bnb_4bit_compute_dtype", "int8"], "bnb_4bit_compute_dtype='int8'"),
    (["--load_in_4bit", "--ds_config", "ds_configs/zero3.json", "--bnb_4bit_quant_storage", "uint8"], "ZeRO-3"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_inputs_fail_with_one_line(tmp_path, args, message):
    """Every mistake in configuration, data or paths: exit code 2, one ``error:`` line, no traceback."""
    bad_files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    defaults = ["--max_steps", "1", "--output_dir", str(tmp_path / "bad")]
    proc = run([*defaults, *args], tmp_path, check=False)  # the case's own values come later and win
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_bad_input_under_the_deepspeed_launcher_is_said_once(tmp_path):
    bad_files(tmp_path)
    for bad in ("broken.json", "clip.json"):  # before and after the process group exists
        proc = run(["--ds_config", str(tmp_path / bad), "--max_steps", "1", "--output_dir", str(tmp_path / "out")],
                   tmp_path, launcher=deepspeed_launcher(29591), check=False)
        errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_sharded_4bit_weights_need_the_storage_of_the_compute_dtype(storage):
    """ZeRO-3 and FSDP2 cast what they gather like any weight: a storage other than the engine's
    dtype would turn the packed 4-bit bytes into other numbers. ``auto`` is that dtype."""
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import ConfigError, parse
    from psilora_ds.recipe.modeling import quantization_config

    cfg = parse(["--load_in_4bit", "true", "--bnb_4bit_quant_storage", storage])
    with pytest.raises(ConfigError, match="ZeRO-3 or FSDP2 needs bnb_4bit_quant_storage equal"):
        quantization_config(cfg, torch.bfloat16, shards_weights=True)
    assert quantization_config(cfg, torch.bfloat16, shards_weights=False).bnb_4bit_quant_storage == getattr(torch, storage)
    auto = parse(["--load_in_4bit", "true"])
    assert quantization_config(auto, torch.bfloat16, shards_weights=True).bnb_4bit_quant_storage == torch.bfloat16


def test_bitsandbytes_unusable_device_is_a_clear_error():
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import ConfigError
    from psilora_ds.recipe.modeling import check_bitsandbytes

    with pytest.raises(ConfigError, match="bitsandbytes cannot run 4-bit layers on meta"):
        check_bitsandbytes(torch.device("meta"))


def test_config_reference_is_current():
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import reference_markdown

    with open(os.path.join(ROOT, "docs", "CONFIG.md")) as f:
        assert f.read() == reference_markdown(), "regenerate it: python -m psilora_ds.recipe.config > docs/CONFIG.md"


def test_prompt_tokens_are_masked(tmp_path):
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.data import IGNORE, build_datasets
    from psilora_ds.recipe.modeling import build_tokenizer

    data = tmp_path / "pairs.jsonl"
    rows = [{"q": f"what is {i} plus one", "a": f"{i + 1}"} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = parse(["--model", "builtin:tiny-llama", "--dataset", str(data), "--prompt_field", "q", "--response_field", "a", "--packing", "false",
                 "--cache_dir", str(tmp_path / "cache"), "--eval_fraction", "0.1", "--corpus_lines", "300"])
    tok = build_tokenizer(cfg)  # the BPE of the generated corpus
    train, evals = build_datasets(cfg, tok)
    assert len(train) + len(evals) == 40
    for row in train:
        labels, ids = row["labels"], row["input_ids"]
        n_prompt = sum(1 for x in labels if x == IGNORE)
        assert n_prompt > 0 and labels[n_prompt:] == ids[n_prompt:]
        prompt = tok.decode(ids[:n_prompt])
        assert prompt.startswith("what is") and prompt.endswith("\n")


@pytest.mark.slow
def test_torchrun_ddp_two_ranks(tmp_path):
    """Plain PyTorch DDP under torchrun: PSI-LoRA detects the process group."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544"]
    out = tmp_path / "ddp"
    run(["--max_steps", "4", "--eval_every", "4", "--save_every", "0", "--output_dir", str(out)], tmp_path,
        launcher=torchrun)
    assert_outputs(out)


def test_clip_norm_probes_reaches_the_optimizer():
    """``--clip_norm_probes k`` makes the one-process clipping norm the k-probe sketch; negative is a one-line error."""
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import ConfigError, TrainConfig, validate
    from psilora_ds.recipe.optimizers import build_optimizer

    from .models import lora_two_layer_net

    for k in (0, 16):
        opt = build_optimizer(TrainConfig(optim="psilora", clip_norm_probes=k), lora_two_layer_net())
        assert opt.distributor.norm_probes == k and opt.distributor.sketches_norm() == (k > 0)
        assert opt.max_grad_norm == 1.0
    with pytest.raises(ConfigError, match="clip_norm_probes must be >= 0"):
        validate(TrainConfig(clip_norm_probes=-1))


@pytest.mark.parametrize("hidden", [64, 128])
def test_qlora_evaluation_leaves_training_exact(tmp_path, hidden):
    """An evaluation pass between steps must not change the next step's gradients. On AVX512-BF16 CPUs
    bitsandbytes repacks 4-bit weights in eval mode: it crashed for in_features < 64 and, above that,
    made later training forwards drop the gradient into earlier layers (psilora_ds/qlora.py)."""
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.modeling import build_model

    cfg = parse(["--model", "builtin:tiny-llama", "--load_in_4bit", "--bnb_4bit_compute_dtype", "float32",
                 "--tiny_hidden_size", str(hidden),
                 "--tiny_layers", "2", "--lora_dropout", "0", "--cache_dir", str(tmp_path)])
    model = build_model(cfg, tokenizer=range(256), device=torch.device("cpu"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def lora_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        eval_loss = model(input_ids=ids, labels=ids).loss
    after = lora_grads()
    assert torch.isfinite(eval_loss)
    for name, g in before.items():
        torch.testing.assert_close(after[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("optim", ["psilora", "scaled_psilora", "precond_lora", "svdlora", "svdlora_adam", "polar",
                                   "adamw", "loraplus", "riemannian", "sgd"])
def test_every_optim_choice_trains(tmp_path, optim):
    """Each --optim builds and takes 2 steps through the recipe (svdlora once crashed on a keyword)."""
    sys.path.insert(0, ROOT)
    from psilora_ds.optim import OPTIMIZERS_BY_NAME
    from psilora_ds.recipe.optimizers import OPTIMIZERS

    assert optim in OPTIMIZERS
    assert {name for name, entry in OPTIMIZERS.items() if entry.lora} == set(OPTIMIZERS_BY_NAME)
    out = tmp_path / optim
    run(["--optim", optim, "--max_steps", "2", "--eval_every", "2", "--save_every", "0", "--output_dir", str(out),
         "--tiny_hidden_size", "32"], tmp_path)
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


def test_help_is_generated_from_the_fields():
    """Every key appears once with its real default (a list default once showed as its source text)."""
    sys.path.insert(0, ROOT)
    import dataclasses

    from psilora_ds.recipe.config import TrainConfig, help_text

    text = help_text()
    assert "field(" not in text and "default_factory" not in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  --")}
    assert set(rows) == {f"--{f.name}" for f in dataclasses.fields(TrainConfig)}
    assert rows["--betas"].split()[1:3] == ["[0.9,", "0.999]"]
    assert rows["--prompt_template"].split()[1] == '"{prompt}\\n"'
    assert rows["--model"].split()[1] == "builtin:stdlib-llama" and rows["--tokenizer"].split()[1] == "null"
    assert rows["--packing"].split()[1] == "true"
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] in rows[f"--{f.name}"]


def test_preset_paper_fills_what_is_not_given():
    """``--preset paper``: the authors' LLM configuration in our units (psilora_ds/presets.py); a key given
    explicitly wins; the optimizer gets it all; an unknown preset is one line."""
    sys.path.insert(0, ROOT)
    from psilora_ds import ScaledPSILoRA
    from psilora_ds.recipe.config import ConfigError, parse
    from psilora_ds.recipe.optimizers import build_optimizer

    from .models import lora_two_layer_net

    cfg = parse(["--preset", "paper"])
    assert (cfg.optim, cfg.iters, cfg.lr, cfg.betas, cfg.prox, cfg.damping, cfg.metric_power, cfg.metric_init) == \
        ("scaled_psilora", 0, 0.02, [0.0, 0.99], 0.1, 1e-5, 0.5, "ones")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.max_grad_norm, cfg.other_lr) == (8, 8.0, 0.1, 1.0, 1e-4)
    assert parse(["--preset", "paper", "--lr", "0.05"]).lr == 0.05  # explicit wins
    opt = build_optimizer(cfg, lora_two_layer_net())
    group = opt.lora_group
    assert isinstance(opt, ScaledPSILoRA) and opt.cache_free and opt.max_grad_norm == 1.0
    assert (group["lr"], group["iters"], group["betas"], group["prox"], group["metric_init"]) == \
        (0.02, 0, (0.0, 0.99), 0.1, "ones")
    assert opt.other_optimizer.param_groups[0]["lr"] == 1e-4
    with pytest.raises(ConfigError, match="preset='authors': choose one of paper"):
        parse(["--preset", "authors"])


def test_loraplus_and_riemannian_are_peft_optimizers_on_the_lora_factors():
    """``--optim loraplus``: the B factors at loraplus_lr_ratio x lr (peft's groups); ``riemannian``: peft's
    preconditioned AdamW, which changes the LoRA step and leaves the rest AdamW's."""
    sys.path.insert(0, ROOT)
    from psilora_ds.recipe.config import TrainConfig
    from psilora_ds.recipe.optimizers import build_optimizer

    from .models import lora_two_layer_net

    model = lora_two_layer_net()
    opt = build_optimizer(TrainConfig(optim="loraplus", lr=1e-3, loraplus_lr_ratio=16), model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert lr_of[id(p)] == pytest.approx(16e-3), name
        elif "lora_A" in name:
            assert lr_of[id(p)] == pytest.approx(1e-3), name

    def one_step(optim):
        net = lora_two_layer_net()
        o = build_optimizer(TrainConfig(optim=optim, lr=1e-2), net)
        net(torch.randn(8, net.base_model.model.fc1.in_features, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
        o.step()
        return dict(net.named_parameters())

    adamw, riem = one_step("adamw"), one_step("riemannian")
    assert any(not torch.equal(riem[n], adamw[n]) for n in adamw if "lora_" in n)
    assert all(torch.equal(riem[n], adamw[n]) for n in adamw if "lora_" not in n and adamw[n].requires_grad)


def test_lr_not_given_is_the_measured_best_on_a_built_in_base_and_refused_elsewhere(caplog):
    """No --lr: the benchmark's best on a built-in base (logged); on any other model one line that says what to try
    (best lrs do not transfer between models; the ratio to LoRA-AdamW's lr is the advice), before any model loads."""
    sys.path.insert(0, ROOT)
    import logging

    from psilora_ds.recipe.config import ConfigError, TrainConfig
    from psilora_ds.recipe.optimizers import check_optim, resolve_lr

    with caplog.at_level(logging.INFO, logger="psilora_ds"):
        assert resolve_lr(TrainConfig()).lr == 3.16e-3  # metric power 1 (power 1/2's was 0.1)
        assert resolve_lr(TrainConfig(optim="adamw", model="builtin:tiny-llama")).lr == 1e-2
    assert resolve_lr(TrainConfig(lr=0.5, model="org/model")).lr == 0.5
    check_optim(TrainConfig(lr=0.5, model="org/model"))
    lines = [r.getMessage() for r in caplog.records if "lr not given" in r.getMessage()]
    assert len(lines) == 2 and "bench/finetune_real.py" in lines[0]
    for optim, advice in [("scaled_psilora", "0.1-0.32x the lr LoRA-AdamW takes"), ("adamw", "1x the lr"),
                          ("precond_lora", "not measured here: sweep")]:
        for refuse in (check_optim, resolve_lr):
            with pytest.raises(ConfigError, match="lr not given for model /models/llama") as err:
                refuse(TrainConfig(optim=optim, model="/models/llama"))
            assert advice in str(err.value) and "\n" not in str(err.value)


def test_an_lr_in_the_former_metric_power_s_units_is_warned_about_once(caplog):
    """Scaled PSI-LoRA's default K-FAC metric power became 1 (its lr unit a thirtieth to a hundredth of 1/2's): an lr
    over ten times the best measured at power 1 (0.1, the former default's best on the built-in base) is one warning
    that says what to do; the lrs of power 1, power 1/2 given explicitly, and other metrics or methods are not."""
    sys.path.insert(0, ROOT)
    import dataclasses
    import logging

    from peft import LoraConfig, get_peft_model

    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.optimizers import build_optimizer, lr_unit_warning

    from .models import tiny_llama

    cfg = parse(["--lr", "0.1"])
    with caplog.at_level(logging.INFO, logger="psilora_ds"):
        build_optimizer(cfg, get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "metric_power" in r.getMessage()]
    assert len(warned) == 1 and "lr 0.1 is over 10x" in warned[0] and "pass --metric_power 0.5" in warned[0]
    assert "lower --lr about 100x" in warned[0] and "\n" not in warned[0]
    for quiet in (parse([]), parse(["--lr", "3e-2"]), parse(["--lr", "0.1", "--metric_power", "0.5"]),
                  parse(["--lr", "0.1", "--metric", "adafactor"]), parse(["--lr", "0.1", "--optim", "psilora"]),
                  dataclasses.replace(cfg, lr=None)):
        assert lr_unit_warning(quiet) is None, quiet


def test_iters_auto_keeps_rows_while_they_fit_and_goes_cache_free_over_the_budget(caplog):
    """``--iters auto``: 1 while a step's rows (counted independently here from the LoRA layers' shapes) fit the cache
    budget, 0 (cache-free) one byte over it, logged with the figures; an explicit iters >= 1 over the budget warns
    once; a word other than auto is one line."""
    sys.path.insert(0, ROOT)
    import dataclasses
    import logging

    from peft import LoraConfig, get_peft_model

    from psilora_ds.recipe.config import ConfigError, parse
    from psilora_ds.recipe.optimizers import build_optimizer, step_row_bytes

    from .models import tiny_llama

    def model():
        return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    cfg = parse(["--iters", "auto", "--micro_batch_size", "2", "--max_seq_len", "16",
                 "--gradient_accumulation_steps", "3", "--lr", "1e-2"])
    m = model()
    widths = [mod.in_features + mod.out_features for name, mod in m.named_modules()
              if name.endswith(("q_proj.base_layer", "v_proj.base_layer"))]
    rows = step_row_bytes(cfg, m)
    assert len(widths) == 4 and rows == 2 * 16 * 3 * sum(widths) * 4  # fp32 rows
    with caplog.at_level(logging.INFO, logger="psilora_ds"):
        fits = build_optimizer(dataclasses.replace(cfg, cache_max_bytes=str(rows)), model())
        over = build_optimizer(dataclasses.replace(cfg, cache_max_bytes=str(rows - 1)), model())
        explicit = build_optimizer(dataclasses.replace(cfg, iters=2, cache_max_bytes=str(rows - 1)), model())
    assert fits.lora_group["iters"] == 1 and not fits.cache_free
    assert over.lora_group["iters"] == 0 and over.cache_free and explicit.lora_group["iters"] == 2
    chosen = [r.getMessage() for r in caplog.records if "iters auto ->" in r.getMessage()]
    assert len(chosen) == 2 and "-> 1" in chosen[0] and "-> 0" in chosen[1]
    assert f"{rows / 2**20:.1f} MiB per rank (2 x 16 tokens x 3 micro-batches)" in chosen[0]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "iters 2 with" in r.getMessage()]
    assert len(warned) == 1 and "iters 0 (or --iters auto) is the cache-free choice" in warned[0].getMessage()
    with pytest.raises(ConfigError, match="iters='fast': give a number of inner iterations"):
        parse(["--iters", "fast"])


def test_training_and_evaluation_forwards_build_no_kv_cache():
    """The recipe's forwards pass ``use_cache=False``: with the config's default (True) a causal LM would build a KV
    cache in every training forward, copying every layer's keys and values (memory no step needs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from psilora_ds.recipe.config import TrainConfig
    from psilora_ds.recipe.loop import evaluate, train_step

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert model.config.use_cache
    caches = []
    model.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))

    class Engine:  # the recipe's engine interface over the plain model
        def __call__(self, **batch):
            return model(**batch)

        def backward(self, loss):
            loss.backward()

        def step(self):
            model.zero_grad()

    ids = torch.randint(0, 50, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    cfg = TrainConfig(micro_batch_size=2, gradient_accumulation_steps=2, eval_batches=2)
    record = train_step(Engine(), iter([batch, batch]), cfg, 1, torch.device("cpu"), 1)
    rows = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}] * 4  # (the tokenized dataset's records)
    metrics = evaluate(Engine(), model, rows, cfg, 0, 1, 0, torch.device("cpu"))
    assert len(caches) == 4 and math.isfinite(record["loss"]) and math.isfinite(metrics["eval_loss"])
    assert all(cache is None for cache in caches), caches
    assert model(input_ids=ids).past_key_values is not None  # (what the hook would have seen without it)


def test_evaluation_is_one_pass_over_the_held_out_split():
    """The eval loss is the token-weighted mean over every held-out sequence once (computed here sequence by
    sequence), whatever the micro-batch size; on 2 ranks with an odd count each rank runs the same number of
    forwards and the ranks' sums add up to it; ``eval_batches`` takes the first micro-batches of the pass."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from psilora_ds.recipe.config import TrainConfig
    from psilora_ds.recipe.loop import evaluate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (5, 9, 12, 7, 12, 3, 10):  # 7 sequences of unequal lengths, prompt tokens masked in one
        ids = torch.randint(1, 50, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:] if n == 9 else ids})
    nll = tokens = 0.0
    with torch.no_grad():
        for r in rows:
            labels = torch.tensor([r["labels"]])
            count = float((labels[:, 1:] != -100).sum())
            nll += float(model(input_ids=torch.tensor([r["input_ids"]]), labels=labels).loss) * count
            tokens += count
    expected = nll / tokens
    forwards = []
    model.register_forward_hook(lambda module, args, out: forwards.append(1))

    def engine(**batch):
        return model(**batch)

    def run(mbs, rank=0, world=1, eval_batches=0):
        import psilora_ds.recipe.loop as loop

        cfg = TrainConfig(micro_batch_size=mbs, eval_batches=eval_batches)
        sums = []
        over = loop.over_ranks
        loop.over_ranks = lambda values: sums.append(list(values)) or values  # this rank's (loss sum, tokens)
        try:
            forwards.clear()
            result = loop.evaluate(engine, model, rows, cfg, rank, world, 0, torch.device("cpu"))
        finally:
            loop.over_ranks = over
        return result, sums[0], len(forwards)

    for mbs in (1, 2, 3, 7):
        result, _, n = run(mbs)
        assert result["eval_loss"] == pytest.approx(expected, rel=1e-5) and n == math.ceil(7 / mbs)
    for mbs in (1, 2, 3):  # rank 0 holds 4 sequences, rank 1 holds 3
        (_, s0, n0), (_, s1, n1) = run(mbs, 0, 2), run(mbs, 1, 2)
        assert n0 == n1 == math.ceil(4 / mbs)
        assert (s0[0] + s1[0]) / (s0[1] + s1[1]) == pytest.approx(expected, rel=1e-5)
        assert s0[1] + s1[1] == tokens
    first, _, n = run(2, eval_batches=1)  # the first micro-batch: sequences 0 and 1
    assert n == 1
    both = [(5, rows[0]), (9, rows[1])]
    with torch.no_grad():
        parts = [(float(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss),
                  sum(1 for t in r["labels"][1:] if t != -100)) for _, r in both]
    assert first["eval_loss"] == pytest.approx(sum(loss * c for loss, c in parts) / sum(c for _, c in parts), rel=1e-5)
    assert run(2, eval_batches=50)[2] == 4  # more than the split: one pass, never wrapped around
