"""Run outputs: metrics as JSON lines, the adapter and the merged model (checkpoints:
:mod:`psilora_ds.recipe.checkpoint`, plot: :mod:`psilora_ds.recipe.plot`)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

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


def save_outputs(output_dir: str, model, tokenizer, state: dict[str, torch.Tensor], *, merge: bool) -> None:
    """``adapter/`` (peft, from the fp32 masters in ``state``) and ``merged/`` when asked."""
    model.save_pretrained(os.path.join(output_dir, "adapter"), state_dict=state)
    tokenizer.save_pretrained(os.path.join(output_dir, "adapter"))
    if merge:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state:
                    p.copy_(state[name].to(p.dtype))
        model.merge_and_unload().save_pretrained(os.path.join(output_dir, "merged"))
