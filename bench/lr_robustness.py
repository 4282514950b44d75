"""Learning-rate robustness on the recipe's offline default (tiny LLaMA, generated corpus, LoRA r=16
on all linear layers): eval loss after a fixed budget across an LR grid spanning 3 decades, for
LoRA-AdamW, PSI-LoRA (iters 1, momentum 0.9) and Scaled PSI-LoRA (iters 1). Each point is one run of
``launch/train.py`` (one process, fixed seed); the table and a PNG show eval loss against lr.

    python bench/lr_robustness.py [--steps 100] [--write docs/BENCHMARKS.md] [--png docs/lr_robustness.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import markdown_table, write_section  # noqa: E402

GRID = {  # one point per decade, 3 decades (--fine adds the half-decades)
    "LoRA-AdamW": ("adamw", [1e-4, 1e-3, 1e-2, 1e-1]),
    "PSI-LoRA (iters 1, momentum 0.9)": ("psilora", [1e-3, 1e-2, 1e-1, 1.0]),
    "Scaled PSI-LoRA (iters 1)": ("scaled_psilora", [1e-4, 1e-3, 1e-2, 1e-1]),
}


def final_eval(optim: str, lr: float, steps: int, cache: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--optim", optim, "--lr", str(lr),
               "--max_steps", str(steps), "--eval_every", str(steps), "--save_every", "0", "--output_dir", out,
               "--cache_dir", cache, "--iters", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            return float("nan")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        return records[-1].get("eval_loss", float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--write", default=None)
    parser.add_argument("--png", default=None)
    parser.add_argument("--fine", action="store_true", help="also the half-decade points (twice the runs)")
    args = parser.parse_args()
    cache = os.path.join(ROOT, ".cache", "psilora_ds")
    results = {}
    for name, (optim, lrs) in GRID.items():
        if args.fine:
            lrs = sorted(lrs + [lr * 10**0.5 for lr in lrs[:-1]])
        results[name] = [(lr, final_eval(optim, lr, args.steps, cache)) for lr in lrs]
        print(name, results[name], flush=True)
    rows = []
    for name, points in results.items():
        finite = [v for _, v in points if v == v]
        best = min(finite) if finite else float("nan")
        within = sum(1 for v in finite if v <= best + 0.1)
        rows.append([name, *(f"{lr:g}: {v:.3f}" for lr, v in points), f"{best:.3f}", f"{within}/{len(points)}"])
    n = max(len(p) for p in results.values())
    table = markdown_table(["method", *(f"lr {i + 1}" for i in range(n)), "best eval loss",
                            "lrs within 0.1 of best"], rows)
    print(table)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for name, points in results.items():
            ax.semilogx(*zip(*points), "o-", label=name)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"eval loss after {args.steps} steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png)
    if args.write:
        body = table + ("\n\nBefore training the loss is 6.27 (train loss at step 1). One seed per point; LoRA on a randomly "
                        "initialized tiny base, so this is a smoke-scale check of the paper's LR-robustness claim, "
                        "not a reproduction.")
        if args.png:
            body += f"\n\n![lr robustness]({os.path.basename(args.png)})"
        write_section(args.write, "Learning-rate robustness (offline default)",
                      f"python bench/lr_robustness.py --steps {args.steps}" + (" --fine" if args.fine else "")
                      + (f" --png {args.png}" if args.png else ""),
                      body)


if __name__ == "__main__":
    main()
