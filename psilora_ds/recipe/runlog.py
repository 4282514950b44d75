"""Run outputs: metrics as JSON lines, the adapter and the merged model (checkpoints:
:mod:`psilora_ds.recipe.checkpoint`, plot: :mod:`psilora_ds.recipe.plot`)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from ..polar_adapter import export_plain_lora, polar_layers

from .checkpoint_files import publish_directory
from .config import ConfigError


class MetricsLog:
    """Append-only ``metrics.jsonl`` written by rank 0; resuming drops lines after the resumed step."""

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled

    def restart(self) -> None:
        """A fresh run starts a fresh curve."""
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [json.dumps(r) + "\n" for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    log = write  # (the MetricLogger protocol of psilora_ds.recipe.loggers)

    def close(self, exit_code: int) -> None:
        """Nothing held open: each record is appended and closed."""


def make_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir={path} cannot be created ({err.strerror}): choose another") from None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line cut short by a killed run is left out."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def save_outputs(output_dir: str, model, tokenizer, state: dict[str, torch.Tensor], *, merge: bool,
                 base_name: str | None = None) -> None:
    """``adapter/`` (peft, from the fp32 masters in ``state``) and ``merged/`` when asked, each written into a hidden
    directory and published by renames once complete (a full disk or a kill leaves the previous one whole).
    Non-finite weights are refused (one line), never written. ``base_name``: how the adapter names its base
    (a built-in base's name, not the path of this machine's cache)."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in state.values() if t.is_floating_point())
    if bad:
        raise ConfigError(f"the adapter holds {bad} non-finite values: not written to {output_dir}/adapter; resume "
                          "from the newest checkpoint with a lower --lr")

    polar = bool(polar_layers(model))

    def name_base() -> None:
        if base_name is not None:
            for config in model.peft_config.values():
                config.base_model_name_or_path = base_name

    def write_adapter(path: str) -> None:
        name_base()
        if polar:  # a PoLAR adapter loads as plain LoRA in stock peft, silently without S: write the fold instead
            export_plain_lora(model, path, state=state)
        else:
            # the recipe never resizes the vocabulary, so the base's embeddings are never part of the adapter; saying so
            # spares peft's "auto" check, which looks the base up on the hub at every save (a warning for a built-in
            # or local base, a network wait on nodes without one)
            model.save_pretrained(path, state_dict=state, save_embedding_layers=False)
        tokenizer.save_pretrained(path)

    def write_polar(path: str) -> None:
        name_base()
        model.save_pretrained(path, state_dict=state, save_embedding_layers=False)
        with open(os.path.join(path, "README-psilora.txt"), "w") as f:
            f.write("A PoLAR adapter (Delta W = s B S A, directions as trained). Load it with\n"
                    "psilora_ds.polar_adapter.load_polar(base, path): stock PeftModel.from_pretrained would load it as\n"
                    "plain LoRA without its core S. ../adapter holds the same update as a plain LoRA adapter.\n")

    def write_merged(path: str) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state:
                    p.copy_(state[name].to(p.dtype))
        model.merge_and_unload().save_pretrained(path)

    _publish_dir(output_dir, "adapter", write_adapter)
    if polar:
        _publish_dir(output_dir, "adapter_polar", write_polar)
    if merge:
        _publish_dir(output_dir, "merged", write_merged)


def _publish_dir(output_dir: str, name: str, write) -> None:
    final = os.path.join(output_dir, name)
    partial = os.path.join(output_dir, f".{name}.partial")
    old = os.path.join(output_dir, f".{name}.old")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(partial)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(f"{final} could not be written ({err.strerror}); the checkpoints are kept: free space and "
                          "run again with --resume_from_checkpoint latest") from None
    publish_directory(partial, final, old)
    shutil.rmtree(old, ignore_errors=True)


def summary_line(output_dir: str, wall_s: float) -> str:
    """The run in one line: steps, train loss (mean of the last 10 logged steps), the last eval loss and
    perplexity, wall time of this process's training, and where the outputs are."""
    records = [r for r in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if r.get("step", 0) > 0]
    train = [r["loss"] for r in records if "loss" in r][-10:]
    evals = [r for r in records if "eval_loss" in r]
    parts = [f"done: {records[-1]['step'] if records else 0} steps"]
    if train:
        parts.append(f"train loss {sum(train) / len(train):.4f} (last {len(train)} steps)")
    if evals:
        parts.append(f"eval loss {evals[-1]['eval_loss']:.4f} (perplexity {evals[-1]['eval_ppl']:.2f})")
    parts.append(f"{wall_s:.0f} s")
    parts.append(f"outputs in {output_dir}: adapter/, metrics.jsonl, loss.png, checkpoints/")
    return "; ".join(parts)
