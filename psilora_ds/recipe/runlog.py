"""Run outputs: metrics as JSON lines, and checkpoint directories with rotation and "latest"."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


class MetricsLog:
    """Append-only ``metrics.jsonl`` written by rank 0; resuming drops lines after the resumed step."""

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoint_dirs(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := CHECKPOINT_RE.match(name)) and os.path.exists(os.path.join(root, name, "trainer_state.json"))]
    return sorted(found)


def resolve_resume(spec: str | None, root: str) -> str | None:
    """``None``, a checkpoint directory, or ``"latest"`` (the newest complete one under ``root``)."""
    if spec is None:
        return None
    if spec == "latest":
        found = checkpoint_dirs(root)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest but {root} holds no checkpoint")
        return found[-1][1]
    if not os.path.exists(os.path.join(spec, "trainer_state.json")):
        raise FileNotFoundError(f"resume_from_checkpoint={spec} is not a checkpoint directory (no trainer_state.json)")
    return spec


def rotate(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _, path in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
