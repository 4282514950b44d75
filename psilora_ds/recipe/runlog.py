"""Run outputs: metrics as JSON lines (checkpoints: :mod:`psilora_ds.recipe.checkpoint`)."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsLog:
    """Append-only ``metrics.jsonl`` written by rank 0; resuming drops lines after the resumed step."""

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled

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
