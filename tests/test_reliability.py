"""Nothing a run did is lost or corrupted: divergence never reaches the weights or the checkpoints, a resume says
what it changes and refuses what it cannot continue, damaged checkpoints are skipped, crafted ones never run
code, one run per output_dir, preemption saves. Each test injects its fault (``PSILORA_DS_FAULT``, a crafted
file, a held lock) into launch/train.py and checks exit code, the one ``error:`` line and what is on disk."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch

from psilora_ds.recipe import checkpoint
from psilora_ds.recipe.checkpoint_files import TRAINER_STATE, read_manifest, sha256_of, write_manifest
from psilora_ds.recipe.config import ConfigError
from psilora_ds.recipe.run_lock import RunLock

from .test_train_recipe import ROOT, all_records, assert_same_curve, deepspeed_launcher, metrics, run

MARKER_ENV = "PSILORA_TEST_MARKER"
FAST = ["--max_steps", "6", "--save_every", "2", "--eval_every", "3", "--warmup_steps", "0", "--save_total_limit", "5"]


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_one_error(proc, text, code=2):
    errors = error_lines(proc)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(errors) == 1 and text in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout


def saved_tensors(step_dir):
    return torch.load(os.path.join(step_dir, "state.pt"), weights_only=True)


def all_finite(step_dir):
    state = saved_tensors(step_dir)
    tensors = list(state["trainable"].values())
    stack = [state["optimizer"]]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One uninterrupted FAST run (checkpoints 2, 4, 6) that tests copy and damage; ``(tmp, its directory)``."""
    tmp = tmp_path_factory.mktemp("fast")
    run([*FAST, "--output_dir", str(tmp / "straight")], tmp)
    return tmp, tmp / "straight"


def copy_run(fast_run, to):
    shutil.copytree(fast_run[1], to)
    return to


def steps_of(out):
    return sorted(int(d.split("-")[1]) for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step-"))


# ---- finding 1: a non-finite update is not applied, never saved; a diverged run stops with one line ----------

def test_the_non_finite_check_flags_nan_and_inf_in_every_float_dtype():
    """``any_non_finite`` (the step's, the undo's and the checkpoint's check): a NaN or an infinity anywhere, in any
    float dtype, is flagged, beside finite tensors of other dtypes; integer tensors and empty lists are skipped."""
    from psilora_ds.optim.finite_guard import any_non_finite

    finite = [torch.full((4,), 1e30), torch.ones(2, dtype=torch.bfloat16), torch.arange(3), torch.ones(3).double()]
    assert float(any_non_finite(finite)) == 0.0
    assert float(any_non_finite([])) == 0.0
    assert float(any_non_finite([torch.tensor([1, 2])])) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            t = torch.zeros(5, dtype=dtype)
            t[3] = bad
            assert float(any_non_finite([*finite, t])) == 1.0, (bad, dtype)


@pytest.mark.parametrize("optim", ["scaled_psilora", "psilora", "adamw", "loraplus"])
def test_an_update_that_overflows_is_not_applied(tmp_path, optim):
    out = tmp_path / optim
    run(["--optim", optim, "--max_steps", "4", "--save_every", "1", "--warmup_steps", "0", "--save_total_limit", "4",
         "--output_dir", str(out)], tmp_path, extra_env={"PSILORA_DS_FAULT": "nan:3"})
    records = {r["step"]: r for r in metrics(out)}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    step2, step3 = saved_tensors(out / "checkpoints" / "step-2"), saved_tensors(out / "checkpoints" / "step-3")
    for name, value in step2["trainable"].items():  # step 3 left every weight as step 2 had it
        assert torch.equal(step3["trainable"][name], value), name
    assert all(all_finite(out / "checkpoints" / f"step-{s}") for s in (1, 2, 3, 4))
    assert records[4]["loss"] == records[4]["loss"] and os.path.exists(out / "adapter")


def test_a_diverging_run_stops_with_one_line_and_keeps_its_finite_checkpoints(tmp_path):
    out = tmp_path / "nan"
    proc = run(["--model", "builtin:stdlib-llama", "--dataset", "builtin:python-reference", "--lr", "1e2", "--max_steps", "40", "--save_every", "5", "--save_total_limit", "2",
                "--max_skipped_steps", "3", "--output_dir", str(out)], tmp_path, check=False)
    assert_one_error(proc, "steps in a row were skipped because their updates were not finite")
    assert "Resume from" in error_lines(proc)[0]
    assert not os.path.exists(out / "adapter")  # no adapter from a diverged run
    saved = steps_of(out)
    assert saved and all(all_finite(out / "checkpoints" / f"step-{s}") for s in saved)
    assert max(r["step"] for r in metrics(out)) < 40


# ---- finding 2 and 9: a resume applies a new lr and schedule length, says so, and refuses past max_steps ------

def test_resume_applies_a_new_lr_and_schedule_and_logs_it(tmp_path):
    out = tmp_path / "run"
    args = ["--max_steps", "4", "--save_every", "2", "--warmup_steps", "0", "--lr_scheduler", "linear"]
    run([*args, "--output_dir", str(out)], tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-4")
    proc = run([*args[2:], "--max_steps", "8", "--lr", "5e-3", "--output_dir", str(out),
                "--resume_from_checkpoint", "latest"], tmp_path)
    log = proc.stderr + proc.stdout
    assert "resume applies a changed setting: lr: 0.01 -> 0.005" in log
    assert "resume applies a changed setting: max_steps: 4 -> 8" in log
    lrs = {r["step"]: r["lr"] for r in metrics(out)}
    # linear decay over 8 steps from 5e-3, continued at step 3 (0-based position 2)
    for step in range(3, 9):
        assert lrs[step] == pytest.approx(5e-3 * (8 - (step - 1)) / 8), step
    proc = run(["--max_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint", "latest"], tmp_path,
               check=False)
    assert_one_error(proc, "is at step 8 and max_steps is 8: nothing to train")


# ---- finding 3: another model, scaling, rank or targets is refused ----------------------------------------------

@pytest.mark.parametrize("change,text", [
    (["--tiny_hidden_size", "32"], "another architecture"),
    (["--model", "builtin:stdlib-llama"], "resume with --model builtin:tiny-llama"),
    (["--lora_alpha", "64"], "trained with lora_alpha=32.0"),
    (["--lora_r", "8"], "differing in name or shape"),
    (["--target_modules", "[q_proj]"], "differing in name or shape"),
    (["--optim", "adamw"], "trained with optim=scaled_psilora"),
    # the momentum's rank shapes the state: the checkpoint records the default the run got (2), not null
    (["--rank_multiplier", "1"], "trained with rank_multiplier=2.0 and this run has rank_multiplier=1.0"),
    # the metric's power sets the lr's unit: a run made before its default became 1 is not resumed at 1
    (["--metric_power", "0.5"], "trained with metric_power=1.0 and this run has metric_power=0.5: a resume continues "
                                "the same adapter; resume with --metric_power 1.0"),
])
def test_resume_refuses_another_model_or_adapter(fast_run, tmp_path, change, text):
    out = copy_run(fast_run, tmp_path / "run")
    proc = run(["--max_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint", "latest", *change],
               tmp_path, check=False)
    assert_one_error(proc, text)


# ---- finding 4: checksums; latest falls back past a damaged checkpoint; a named one is one line ------------------

def flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])


@pytest.mark.parametrize("damage,name", [(flip_byte, "state.pt"), (truncate, "rank-0.pt"),
                                         (truncate, TRAINER_STATE), (flip_byte, TRAINER_STATE)])
def test_a_damaged_newest_checkpoint_is_skipped_and_a_named_one_refused(fast_run, tmp_path, damage, name):
    out = fast_run[1]
    cut = copy_run(fast_run, tmp_path / "cut")
    shutil.rmtree(cut / "checkpoints" / "step-6")
    damage(cut / "checkpoints" / "step-4" / name)
    proc = run([*FAST, "--output_dir", str(cut), "--resume_from_checkpoint", str(cut / "checkpoints" / "step-4")],
               tmp_path, check=False)
    assert_one_error(proc, "step-4")
    proc = run([*FAST, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path)
    assert "skipping checkpoint" in proc.stderr and "step-4" in proc.stderr
    assert "resumed from " + str(cut / "checkpoints" / "step-2") in proc.stderr
    assert_same_curve(out, cut, 2)


# ---- issue 28: a crafted checkpoint never runs code ----------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(step_dir, name, marker):
    """Add the payload to ``name`` and record the new file's digest, as an attacker who rewrites the manifest can."""
    path = os.path.join(step_dir, name)
    obj = torch.load(path, weights_only=True)
    obj["extra"] = Payload(marker)
    torch.save(obj, path)
    body = read_manifest(step_dir)
    body["files"][name] = sha256_of(path)
    body.pop("format")
    write_manifest(step_dir, body)


@pytest.mark.parametrize("name", ["state.pt", "rank-0.pt"])
def test_a_crafted_checkpoint_never_runs_code(fast_run, tmp_path, name):
    out = copy_run(fast_run, tmp_path / "run")
    marker = tmp_path / "marker"
    craft(str(out / "checkpoints" / "step-6"), name, marker)
    shutil.rmtree(out / "checkpoints" / "step-4")
    proc = run([*FAST, "--max_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint",
                str(out / "checkpoints" / "step-6")], tmp_path, check=False)
    assert not marker.exists()
    assert_one_error(proc, f"{name} holds objects other than tensors and plain containers, refused")
    proc = run([*FAST, "--max_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint", "latest"], tmp_path)
    assert not marker.exists()
    assert "skipping checkpoint" in proc.stderr and "resumed from " + str(out / "checkpoints" / "step-2") in proc.stderr


def test_dcp_metadata_is_read_without_running_code(tmp_path):
    """FSDP2 checkpoints: torch's reader unpickles ``.metadata`` freely; ours builds DCP's metadata classes only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from psilora_ds.distributed.fsdp import safe_dcp_reader

    state = {"w": torch.arange(6.0).reshape(2, 3), "extra": {"scheduler": {"last_epoch": 3, "base_lrs": [0.1]}}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ok"))
    into = {"w": torch.zeros(2, 3), "extra": {"scheduler": {"last_epoch": 0, "base_lrs": [0.0]}}}
    dcp.load(into, storage_reader=safe_dcp_reader(str(tmp_path / "ok")))
    assert torch.equal(into["w"], state["w"]) and into["extra"]["scheduler"]["last_epoch"] == 3

    marker = tmp_path / "marker"
    shutil.copytree(tmp_path / "ok", tmp_path / "crafted")
    with open(tmp_path / "crafted" / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(pickle.UnpicklingError, match="global (posix|os).system is not allowed"):
        safe_dcp_reader(str(tmp_path / "crafted")).read_metadata()
    with pytest.raises(CheckpointException):  # (DCP wraps the refusal in its exception, a BaseException)
        dcp.load(into, storage_reader=safe_dcp_reader(str(tmp_path / "crafted")))
    assert not marker.exists()


def test_a_checkpoint_of_the_previous_format_is_refused_then_converted(fast_run, tmp_path):
    out = copy_run(fast_run, tmp_path / "run")
    step6 = out / "checkpoints" / "step-6"
    body = read_manifest(str(step6))
    old = {k: body[k] for k in ("step", "world_size", "optim", "engine", "engine_skipped_steps", "rank_specific")}
    (step6 / TRAINER_STATE).write_text(json.dumps(old))
    proc = run([*FAST, "--max_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint", str(step6)],
               tmp_path, check=False)
    assert_one_error(proc, "python -m psilora_ds.recipe.checkpoint upgrade")
    conv = subprocess.run([sys.executable, "-m", "psilora_ds.recipe.checkpoint", "upgrade", str(step6)], cwd=ROOT,
                          capture_output=True, text=True)
    assert conv.returncode == 0, conv.stderr
    proc = run([*FAST, "--max_steps", "8", "--output_dir", str(out), "--resume_from_checkpoint", str(step6)], tmp_path)
    assert "were not recorded" in proc.stderr and max(r["step"] for r in metrics(out)) == 8


# ---- finding 5: one run per output_dir; a fresh run does not mix with another run's checkpoints ----------------

def test_one_run_per_output_dir_and_no_fresh_run_over_checkpoints(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    lock = RunLock(str(out))
    lock.acquire()  # a live run holds the directory
    proc = run(["--max_steps", "2", "--output_dir", str(out)], tmp_path, check=False)
    assert_one_error(proc, "is in use by a running job (host ")
    lock.release()  # (a dead holder releases it too: the kernel drops flock locks with the process)
    run(["--max_steps", "2", "--output_dir", str(out)], tmp_path)
    proc = run(["--max_steps", "2", "--output_dir", str(out)], tmp_path, check=False)
    assert_one_error(proc, "holds the checkpoints of an earlier run (newest: step-2)")
    run(["--max_steps", "3", "--save_every", "3", "--output_dir", str(out), "--overwrite_output_dir", "true"], tmp_path)
    assert steps_of(out) == [3]


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """flock raising ENOLCK (a file system without locks) is not a traceback: the run goes on and says so."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="psilora_ds.recipe.run_lock"):
        assert RunLock(str(tmp_path)).acquire() is False
    assert "does not support file locks" in caplog.text and "would not be refused" in caplog.text

    def other_error(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", other_error)  # any other failure is not taken for "no locks": one line
    with pytest.raises(ConfigError, match="its lock file could not be locked"):
        RunLock(str(tmp_path)).acquire()


# ---- finding 6: SIGTERM finishes the step, saves, exits non-zero; the resume continues the same curve ------------

def test_sigterm_saves_the_step_and_resumes_the_same_curve(fast_run, tmp_path):
    out = fast_run[1]
    cut = tmp_path / "cut"
    proc = run([*FAST, "--output_dir", str(cut)], tmp_path, check=False, extra_env={"PSILORA_DS_FAULT": "sigterm:3"})
    assert_one_error(proc, "stopped by SIGTERM after step 3", code=143)
    assert steps_of(cut) == [2, 3]
    run([*FAST, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path)
    assert_same_curve(out, cut, 3)


def test_ctrl_c_saves_the_step_and_a_second_one_stops_at_once(tmp_path):
    """SIGINT (Ctrl-C) is a stop request like SIGTERM: the step finishes, is saved, the run exits 130 with one line;
    a second SIGINT raises KeyboardInterrupt at once; a process that ignores SIGINT keeps ignoring it."""
    import signal

    from psilora_ds.recipe.preemption import StopRequest

    inherited = signal.getsignal(signal.SIGINT)
    out = tmp_path / "int"
    proc = run([*FAST, "--output_dir", str(out)], tmp_path, check=False, extra_env={"PSILORA_DS_FAULT": "sigint:3"})
    if inherited == signal.SIG_IGN:  # the suite runs as a background job (`pytest ... &` in a script starts it with
        # SIGINT ignored): its runs inherit that and keep ignoring it, so the run finishes (the last check below)
        assert proc.returncode == 0 and not error_lines(proc) and steps_of(out)[-1] == 6, proc.stderr[-3000:]
    else:
        assert_one_error(proc, "stopped by SIGINT after step 3", code=130)
        assert "interrupted: finishing this step and saving a checkpoint" in proc.stderr
        assert steps_of(out) == [2, 3]

    signal.signal(signal.SIGINT, signal.default_int_handler)  # (this process's own checks: as in a terminal)
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # at once: the same Ctrl-C, forwarded by a launcher such as torchrun
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the strongest request names the exit code
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopRequest()
        stop.install()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        stop.uninstall()
    finally:
        signal.signal(signal.SIGINT, inherited)


# ---- finding 7: a full disk while saving is one line and keeps the older checkpoints -----------------------------

def test_a_full_disk_while_saving_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run([*FAST, "--output_dir", str(out)], tmp_path, check=False, extra_env={"PSILORA_DS_FAULT": "enospc:4"})
    assert_one_error(proc, "checkpoint step-4 could not be written (No space left on device)")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2"]


# ---- 2 ranks ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_zero2_two_ranks_sigterm_on_one_rank_and_an_overflowing_update(tmp_path):
    """SIGTERM to rank 1 alone stops both ranks after the same step with a complete checkpoint, which resumes the
    uninterrupted curve; an update that overflows is undone on both ranks."""
    ds = deepspeed_launcher(29541)
    args = ["--ds_config", os.path.join(ROOT, "ds_configs", "zero2.json"), *FAST]
    out = tmp_path / "straight"
    run([*args, "--output_dir", str(out)], tmp_path, launcher=ds)
    cut = tmp_path / "cut"
    proc = run([*args, "--output_dir", str(cut)], tmp_path, launcher=ds, check=False,
               extra_env={"PSILORA_DS_FAULT": "sigterm:3:1"})
    assert proc.returncode != 0 and "stopped by SIGTERM after step 3" in proc.stderr, proc.stderr[-3000:]
    assert steps_of(cut) == [2, 3]
    run([*args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], tmp_path, launcher=ds)
    assert_same_curve(out, cut, 3)
    nan = tmp_path / "nan"
    run([*args, "--output_dir", str(nan)], tmp_path, launcher=ds, extra_env={"PSILORA_DS_FAULT": "nan:3"})
    assert [r["skipped_steps"] for r in metrics(nan)][:4] == [0, 0, 1, 1]
    assert all(all_finite(nan / "checkpoints" / f"step-{s}") for s in steps_of(nan))


@pytest.mark.slow
def test_zero3_adamw_saves_and_resumes_the_same_curve(tmp_path):
    """The LoRA-AdamW baseline under ZeRO-3 (its optimizer state saved by position: Optimizer.state_dict fails there)."""
    ds = deepspeed_launcher(29543)
    args = ["--ds_config", os.path.join(ROOT, "ds_configs", "zero3.json"), "--optim", "adamw", *FAST]
    out = tmp_path / "straight"
    run([*args, "--output_dir", str(out)], tmp_path, launcher=ds)
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(out / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    run([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path, launcher=ds)
    assert_same_curve(out, resumed, 2)
    assert all_records(resumed)[0]["step"] == 0


# ---- every method saves and resumes the same curve (one process; 2 ranks above and in test_train_recipe.py) ------

@pytest.mark.parametrize("optim", ["scaled_psilora", "psilora", "precond_lora", "svdlora", "adamw", "loraplus",
                                   "riemannian", "sgd"])
def test_every_method_saves_and_resumes_the_same_curve(tmp_path, optim):
    args = ["--optim", optim, "--max_steps", "4", "--save_every", "2", "--warmup_steps", "0", "--eval_every", "4"]
    out = tmp_path / "straight"
    run([*args, "--output_dir", str(out)], tmp_path)
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copytree(out / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    run([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path)
    assert_same_curve(out, resumed, 2)


# ---- finding 9: the adapter is published atomically and never holds non-finite weights ---------------------------

class _FakeModel:
    """Writes one file of a new adapter, then meets a full disk (or writes it all when ``fail`` is False)."""

    def __init__(self, fail):
        self.fail = fail
        self.peft_config = {}

    def save_pretrained(self, path, state_dict, save_embedding_layers="auto"):  # peft's signature
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "adapter_model.safetensors"), "w") as f:
            f.write("new")
        if self.fail:
            raise OSError(28, "No space left on device")


class _FakeTokenizer:
    def save_pretrained(self, path):
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write("{}")


def test_the_adapter_is_published_whole_or_not_at_all(tmp_path):
    from psilora_ds.recipe.runlog import save_outputs

    state = {"w": torch.ones(2)}
    save_outputs(str(tmp_path), _FakeModel(fail=False), _FakeTokenizer(), state, merge=False)
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_model.safetensors", "tokenizer.json"]
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("old")
    with pytest.raises(ConfigError, match="No space left on device"):
        save_outputs(str(tmp_path), _FakeModel(fail=True), _FakeTokenizer(), state, merge=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_text() == "old"  # the previous one, whole
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no partial left
    with pytest.raises(ConfigError, match="1 non-finite values"):
        save_outputs(str(tmp_path), _FakeModel(fail=False), _FakeTokenizer(), {"w": torch.tensor([1.0, float("nan")])},
                     merge=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_text() == "old"


def signal_after_three_steps(cmd, out, target, signum=None):
    """Start ``cmd`` (a launcher running the recipe into ``out``), and once the base's evaluation and 3 steps are
    logged send ``signum`` (SIGTERM) to ``target(launcher process)``; returns ``(returncode, stderr)``."""
    import signal

    from .distributed import launcher_env

    proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def lines():
        return open(out / "metrics.jsonl").read().count("\n") if os.path.exists(out / "metrics.jsonl") else 0

    deadline = time.time() + 300
    while time.time() < deadline and lines() < 4:
        time.sleep(0.5)
    target(proc).send_signal(signum or signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def assert_stopped_and_saved(out, returncode, stderr, name="SIGTERM"):
    assert returncode != 0 and f"stopped by {name} after step" in stderr, stderr[-3000:]
    saved = steps_of(out)
    assert len(saved) == 1 and saved[0] >= 3 and saved[0] == max(r["step"] for r in metrics(out))


def endless(tmp_path, out):
    """The recipe's arguments of a run that only a signal ends (no periodic checkpoint, no evaluation)."""
    from .test_train_recipe import TRAIN, small_for

    return [TRAIN, *small_for([]), "--cache_dir", str(tmp_path / "cache"), "--max_steps", "100000", "--save_every",
            "0", "--eval_every", "100000", "--output_dir", str(out)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_to_torchrun_reaches_the_ranks_and_saves(tmp_path, name):
    """The documented route: signal torchrun itself; it forwards the signal to its workers, which save and exit.
    SIGINT is a Ctrl-C in torchrun's terminal (its workers run in sessions of their own: torchrun forwards it)."""
    import signal

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29545",
           *endless(tmp_path, out)]
    assert_stopped_and_saved(out, *signal_after_three_steps(cmd, out, lambda proc: proc, getattr(signal, name)),
                             name=name)


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_node_launcher_reaches_the_ranks_and_saves(tmp_path):
    """The documented route under the deepspeed runner: signal its per-node launcher (deepspeed.launcher.launch),
    which forwards SIGTERM to the ranks and waits for them; the ranks save and stop."""
    import psutil

    def node_launcher(runner):
        launchers = [p for p in psutil.Process(runner.pid).children(recursive=True)
                     if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        assert len(launchers) == 1
        return launchers[0]

    out = tmp_path / "zero2"
    cmd = [*deepspeed_launcher(29547), *endless(tmp_path, out), "--ds_config",
           os.path.join(ROOT, "ds_configs", "zero2.json")]
    assert_stopped_and_saved(out, *signal_after_three_steps(cmd, out, node_launcher))


@pytest.mark.parametrize("overflowing", ["lora", "other", None])
def test_a_step_is_applied_whole_or_not_at_all_with_non_lora_trainables(overflowing):
    """PSI-LoRA's step and its other-parameter optimizer's (the trainable head) are one step: when either half's
    update is not finite, neither is applied, and the step counts once."""
    from psilora_ds import ScaledPSILoRA
    from psilora_ds.optim import skipping_non_finite

    from .models import lora_two_layer_net

    model = lora_two_layer_net()
    opt = ScaledPSILoRA(model, 0.1, other_optimizer=lambda ps: skipping_non_finite(torch.optim.AdamW)(ps, lr=1e-2))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(8, model.base_model.model.fc1.in_features, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    model(x).pow(2).sum().backward()
    for group in opt.param_groups:
        if (overflowing == "lora") == (group is opt.lora_group) and overflowing is not None:
            group["lr"] = float("inf")
    opt.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    skipped = opt.skipped_steps + opt.other_optimizer.skipped_steps
    if overflowing is None:
        assert skipped == 0 and any("head" in n for n in changed) and any("lora_A" in n for n in changed)
    else:
        assert skipped == 1 and changed == set(), changed
