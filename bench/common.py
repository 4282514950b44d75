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


def label_lr_axes(ax, ylabel: str, legend_size: int = 8) -> None:
    """Label an eval-loss-against-lr plot (log lr axis set by the caller)."""
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_lr_figure(fig, ax, ylabel: str, path: str, legend_size: int = 8) -> None:
    """Label an eval-loss-against-lr plot (:func:`label_lr_axes`) and write the figure to ``path``."""
    label_lr_axes(ax, ylabel, legend_size)
    fig.tight_layout()
    fig.savefig(path)


def adapter_statistics(adapter_dir: str, scaling: float) -> dict[str, float]:
    """Medians over the LoRA layers of a saved adapter's learned update ``Delta W = scaling B A``: its Frobenius norm
    and its stable rank ``||Delta W||_F^2 / ||Delta W||_2^2`` (how many directions the update really uses, the PoLAR
    paper's diagnosis of LoRA; at most r). From the factors, never the m x n matrix: with ``B = Q_B R_B`` and
    ``A^T = Q_A R_A``, ``Delta W = Q_B (scaling R_B R_A^T) Q_A^T`` has the singular values of the r x r middle."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    norms, stable = [], []
    for name, A in weights.items():
        if "lora_A" in name:
            B = weights[name.replace("lora_A", "lora_B")]
            R_B = torch.linalg.qr(B.double(), mode="r")[1]
            R_A = torch.linalg.qr(A.double().T, mode="r")[1]
            s = torch.linalg.svdvals(scaling * R_B @ R_A.T)
            norms.append(float(s.square().sum().sqrt()))
            stable.append(float(s.square().sum() / s[0].square()) if s[0] > 0 else 0.0)
    return {"update_norm": statistics.median(norms), "stable_rank": statistics.median(stable)}


def code_version() -> str:
    """The first 12 hex digits of the SHA-256 of the library's and the recipe's sources (``psilora_ds/**.py``,
    ``launch/train.py``): which code produced a result."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [os.path.join(root, "launch", "train.py")]
    for folder, _, files in os.walk(os.path.join(root, "psilora_ds")):
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def failed_run(err: BaseException) -> str:
    """How a run the recipe refused or stopped as diverged is recorded: the error's type and first line."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def finished_main(train, argv: list[str]) -> None:
    """``train.main(argv)`` of launch/train.py, in this process; a run the recipe stopped early (a signal reached
    the bench: it returns 128 + N after saving) is not a result and raises."""
    code = train.main(argv)
    if code:
        raise RuntimeError(f"launch/train.py stopped with exit code {code} (a signal reached the bench): not a result")


_first_code: str | None = None  # the sources this process ran its first recipe run with (its imports are those)


def recipe_run(argv: list[str], scaling: float | None, series: tuple[str, ...] = ()) -> dict:
    """One run of ``launch/train.py``'s ``main`` in this process (one thread; its output silenced), into a temporary
    output directory: its eval curve ``{step: eval_loss}``, the training seconds up to each eval step (the sum of the
    step times: time-to-quality, the optimizer's overhead included), the last 10 steps' mean training loss and the
    learned update's :func:`adapter_statistics` (at the adapter's ``scaling``; None: not computed), the per-step values
    of the metrics named in ``series`` (``{"series": {name: [...]}}``, the training steps' records in order), and the
    :func:`code_version` that ran; or ``{"error": ..., "code": ...}`` for a run that diverged or was refused (any other
    exception propagates, and a process whose sources changed since its first run refuses to run on)."""
    import contextlib
    import importlib.util
    import io
    import json
    import tempfile

    from psilora_ds.recipe.config import ConfigError

    global _first_code
    code = code_version()
    _first_code = _first_code or code
    if code != _first_code:  # launch/train.py is read anew per run, the modules it imports are not
        raise RuntimeError(f"the library's sources changed under this running bench ({_first_code} -> {code}): its "
                           "imported modules are the old ones; restart it (finished runs are kept)")
    torch.set_num_threads(1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("psilora_train", os.path.join(root, "launch", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with tempfile.TemporaryDirectory() as out:
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                finished_main(train, [*argv, "--save_every", "0", "--output_dir", out])
            with open(os.path.join(out, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f]
            elapsed, seconds = 0.0, {}
            for r in records:
                elapsed += r.get("step_time", 0.0)
                if "eval_loss" in r:
                    seconds[str(r["step"])] = round(elapsed, 2)
            return {"eval": {str(r["step"]): r["eval_loss"] for r in records if "eval_loss" in r},
                    "code": code, "train_seconds": seconds,
                    "train_last10": statistics.mean([r["loss"] for r in records if "loss" in r][-10:]),
                    **({"series": {name: [r.get(name) for r in records if "loss" in r] for name in series}}
                       if series else {}),
                    **(adapter_statistics(os.path.join(out, "adapter"), scaling) if scaling is not None else {})}
        except ConfigError as err:  # a run the recipe refused, or stopped as diverged, is reported as such
            return {"error": failed_run(err), "code": code}
        except SystemExit as err:  # a refused configuration exits 2 after one error line
            return {"error": f"SystemExit {err.code}", "code": code}
        # any other exception is a bug, not a result: it stops the bench (a map once recorded a TypeError of
        # a library changed under its running workers as a run that failed, which its lr search reads as divergence)


def load_json(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            import json

            return json.load(f)
    return {}


def save_json(results: dict, path: str) -> None:
    """Written atomically: an interrupted bench leaves the previous file whole."""
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
