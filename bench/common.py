"""Shared by the benchmark scripts: timing with repeats, machine and library description, tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median and (max - min) spread of the wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine() -> str:
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        dev = f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    import deepspeed  # noqa: F401 - version only
    import peft
    import transformers

    return (f"{dev}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"deepspeed {deepspeed.__version__}, Python {platform.python_version()}")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY = "## Summary: targets and readings\n"


def write_section(path: str, title: str, command: str, body: str) -> None:
    """Replace (or add) the section ``## title`` of the markdown file ``path``; the hand-written
    summary section (``SUMMARY``) is never rewritten and stays last."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nEach section: the command, the machine and the table it printed.\n"
    section = f"## {title}\n\n`{command}`\n\n{machine()}\n\n{body}\n"
    marker = f"## {title}\n"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + len(marker))
        text = text[:start] + section + ("\n" + text[end + 1:] if end != -1 else "")
    elif SUMMARY in text:  # new sections go before the hand-written summary
        start = text.index(SUMMARY)
        text = text[:start] + section + "\n" + text[start:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def save_lr_figure(fig, ax, ylabel: str, path: str, legend_size: int = 8) -> None:
    """Label an eval-loss-against-lr plot (log lr axis set by the caller) and write it to ``path``."""
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
