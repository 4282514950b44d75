"""The spectral first step of cache-free optimizers: from the activation rows (``first_step_iters`` = 8 LoRSum
iterations, ``--cache_free false``) against the two-sided sketch their hooks take now (no rows; METHOD.md section 5),
on bench/finetune_real.py's task (built-in base, Python reference, r 16, 100 steps), each method at its best lr of
that benchmark and the next lr down, 3 seeds. Issue 26's criterion: the sketch's mean is not worse than the rows'
by more than the seed sd.

    python bench/first_step_sketch.py [--workers 2] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from multiprocessing import get_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import load_json, markdown_table, save_json, write_section  # noqa: E402
from bench.finetune_real import CACHE, held_out_batches, run_point  # noqa: E402

RESULTS = os.path.join(CACHE, "bench-first-step-sketch.json")
FIRST = ["--first_step_iters", "8"]
# name -> (recipe arguments, lrs: bench/finetune_real.py's best and the next one down)
METHODS = {
    "Scaled PSI-LoRA (paper preset, r 8) + first step": (["--preset", "paper", *FIRST], [3.16, 1.0]),
    "PSI-LoRA iters 0 + first step": (["--optim", "psilora", "--iters", "0", *FIRST], [0.1, 0.0316]),
}
CAPTURES = {"rows (8 iterations)": ["--cache_free", "false"], "sketch (no rows)": []}
SEEDS = (0, 1, 2)
STEPS = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    from psilora_ds.recipe.modeling import builtin_base

    base = builtin_base()
    eval_batches, _ = held_out_batches(base)
    done = load_json(RESULTS)
    tasks = [(json.dumps([name, capture, lr, seed]), [*recipe, *CAPTURES[capture]], lr, seed, STEPS, base,
              eval_batches)
             for name, (recipe, lrs) in METHODS.items() for lr in lrs for capture in CAPTURES for seed in SEEDS]
    tasks = [t for t in tasks if t[0] not in done]
    print(f"{len(tasks)} runs to do", flush=True)
    with get_context("spawn").Pool(args.workers, maxtasksperchild=8) as pool:
        for point, _, _, result in pool.imap_unordered(run_point, tasks):
            done[point] = result
            save_json(done, RESULTS)
            print(point, result, flush=True)
    rows = []
    for name, (_, lrs) in METHODS.items():
        for lr in lrs:
            losses = {c: [done[json.dumps([name, c, lr, s])]["eval_loss"] for s in SEEDS] for c in CAPTURES}
            (m_rows, sd_rows), (m_sketch, sd_sketch) = ((statistics.mean(v), statistics.stdev(v))
                                                        for v in losses.values())
            paired = [b - a for a, b in zip(*losses.values())]  # same seed: same data order and initialization
            rows.append([name, f"{lr:g}", f"{m_rows:.4f} +- {sd_rows:.4f}", f"{m_sketch:.4f} +- {sd_sketch:.4f}",
                         f"{m_sketch - m_rows:+.4f}", "yes" if m_sketch - m_rows <= max(sd_rows, sd_sketch) else "NO",
                         ", ".join(f"{d:+.4f}" for d in paired)])
    table = markdown_table(["method", "lr", "first step from the rows", "from the sketch", "sketch - rows",
                            "within the seed sd", "sketch - rows per seed"], rows)
    print(table)
    if args.write:
        write_section(args.write, "Spectral first step: rows against the sketch (issue 26)",
                      "python bench/first_step_sketch.py",
                      f"Built-in base, Python reference, r 16, {STEPS} steps, eval loss over all held-out topics, "
                      f"seeds {', '.join(map(str, SEEDS))} (mean +- sd).\n\n" + table)


if __name__ == "__main__":
    main()
