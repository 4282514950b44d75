"""Loss curves of a run: ``python -m psilora_ds.recipe.plot RUN_DIR`` writes ``RUN_DIR/loss.png`` from
``RUN_DIR/metrics.jsonl`` (train loss per step, eval loss where evaluated, the base's eval loss at step 0)."""

from __future__ import annotations

import argparse
import os

from .runlog import read_metrics


def plot_run(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    records = read_metrics(path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
        if evals[0][0] == 0:  # the base before fine-tuning, evaluated at step 0
            ax.axhline(evals[0][1], color="gray", ls=":", lw=1, label=f"base before fine-tuning ({evals[0][1]:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    out = out or os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = parser.parse_args()
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
