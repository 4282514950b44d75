"""--report_to: TensorBoard event files and the W&B offline run hold what metrics.jsonl holds, read back with
TensorBoard's own reader and from the W&B run file; a resumed run continues both (TensorBoard drops the events
after the resumed step, W&B continues the same run id); a logger whose package is missing is one error line."""

import glob
import json
import os
import shutil

import pytest

from .test_train_recipe import all_records, run

ARGS = ["--max_steps", "4", "--save_every", "2", "--warmup_steps", "0", "--eval_every", "2",
        "--report_to", "tensorboard,wandb"]
WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def wandb_records(path):
    """The records of a W&B run file: its LevelDB-style log (32 KiB blocks of records with a 7-byte header: CRC,
    length, type) after the 7-byte ``:W&B`` file header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    parsed = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def wandb_history(path):
    """``{step: {key: value}}`` of a W&B run file."""
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row.get("_step", record.history.step.num), {}).update(row)
    return history


def wandb_ending(run_dir):
    """``(exit code, marked preempting)`` of the W&B offline run in ``run_dir``."""
    records = wandb_records(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert len(exits) == 1, kinds
    return exits[0], "preempting" in kinds


def test_tensorboard_and_wandb_hold_the_metrics_and_continue_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run([*ARGS, "--output_dir", str(out)], tmp_path, extra_env=WANDB)
    shutil.rmtree(out / "checkpoints" / "step-4")
    run([*ARGS, "--max_steps", "6", "--output_dir", str(out), "--resume_from_checkpoint", "latest"], tmp_path,
        extra_env=WANDB)
    expected = {r["step"]: r for r in all_records(out)}  # (step 0: the base's evaluation)
    assert sorted(expected) == [0, 1, 2, 3, 4, 5, 6]

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()  # (the resumed writer's purge_step drops the first run's steps 3-4)
    for key in ("loss", "lr", "eval_loss"):
        got = {e.step: e.value for e in board.Scalars(key)}
        want = {s: r[key] for s, r in expected.items() if key in r}
        assert sorted(got) == sorted(want), key
        assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want), key

    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    with open(out / "checkpoints" / "step-6" / "trainer_state.json") as f:
        run_id = json.load(f)["run_id"]
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)  # the resume continued the same W&B run
    assert [wandb_ending(r) for r in runs] == [(0, False), (0, False)]  # both finished
    first, resumed = (wandb_history(glob.glob(os.path.join(r, "run-*.wandb"))[0]) for r in runs)
    assert sorted(first) == [0, 1, 2, 3, 4] and sorted(resumed) == [3, 4, 5, 6]
    history = {**first, **resumed}
    for step, record in expected.items():
        for key in ("loss", "eval_loss"):
            if key in record:
                assert history[step][key] == pytest.approx(record[key], rel=1e-6), (step, key)


def test_a_logger_without_its_package_is_one_line(tmp_path):
    fake = tmp_path / "site"
    os.makedirs(fake / "wandb")
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('not installed')\n")
    proc = run(["--max_steps", "1", "--report_to", "wandb", "--output_dir", str(tmp_path / "out")], tmp_path,
               check=False, extra_env={"PYTHONPATH": str(fake)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == ["error: report_to=wandb needs the wandb package: pip install wandb"], \
        proc.stderr[-2000:]


def test_wandb_is_told_how_a_run_ended_a_failed_run_is_not_finished_and_a_stopped_one_is_preempting(tmp_path):
    """A run that diverges exits 2 and its W&B run ends with exit code 2; a run stopped by SIGTERM (its step saved)
    exits 143 and its W&B run is marked preempting with that code (before: both were reported finished, exit 0)."""
    pytest.importorskip("wandb")
    args = ["--max_steps", "4", "--warmup_steps", "0", "--report_to", "wandb", "--save_every", "1"]
    diverged = run([*args, "--max_skipped_steps", "1", "--output_dir", str(tmp_path / "nan")], tmp_path,
                   check=False, extra_env={**WANDB, "PSILORA_DS_FAULT": "nan:2"})
    assert diverged.returncode == 2, diverged.stderr[-2000:]
    stopped = run([*args, "--output_dir", str(tmp_path / "term")], tmp_path, check=False,
                  extra_env={**WANDB, "PSILORA_DS_FAULT": "sigterm:2"})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    for out, ending in ((tmp_path / "nan", (2, False)), (tmp_path / "term", (143, True))):
        runs = glob.glob(str(out / "wandb" / "offline-run-*"))
        assert len(runs) == 1 and wandb_ending(runs[0]) == ending, out
