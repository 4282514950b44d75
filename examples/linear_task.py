"""The paper's linear synthetic task, offline, on CPU in about a quarter of a minute.

Identity inputs, a random 600 x 200 target, rank-8 LoRA from peft's initialization, summed MSE,
full batch. Prints, per method, the fraction of reducible loss left after ``--steps`` steps:
``(f - f_opt) / (f_0 - f_opt)`` with ``f_opt`` from the SVD of the target (0 = the best rank-8 fit).

    python examples/linear_task.py [--steps 100] [--lr 0.1] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA, SVDLoRA
from psilora_ds.synthetic import linear_task, reducible_left, train_full_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1, help="step size of the SGD-type methods")
    parser.add_argument("--adam_lr", type=float, default=1e-2, help="lr of LoRA+AdamW")
    parser.add_argument("--scaled_lr", type=float, default=0.3, help="lr of Scaled PSI-LoRA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    methods = {
        "SVDLoRA (oracle)": lambda m: SVDLoRA(m, args.lr),
        "preconditioned LoRA": lambda m: PreconditionedLoRA(m, args.lr),
        "PSI-LoRA iters=1": lambda m: PSILoRA(m, args.lr, iters=1),
        "PSI-LoRA iters=2": lambda m: PSILoRA(m, args.lr, iters=2),
        "PSI-LoRA iters=8": lambda m: PSILoRA(m, args.lr, iters=8),
        # metric power 1/2 (the paper's; the README's figures of this task): --scaled_lr is in its units
        "Scaled PSI-LoRA": lambda m: ScaledPSILoRA(m, args.scaled_lr, betas=(0.0, 0.999), iters=2, metric_power=0.5),
        "LoRA + AdamW": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.adam_lr),
    }
    print(f"| method | reducible loss left after {args.steps} steps |\n|---|---|")
    for name, make in methods.items():
        task = linear_task(args.seed)
        print(f"| {name} | {reducible_left(task, train_full_batch(task, make, args.steps)):.4g} |")


if __name__ == "__main__":
    main()
