"""Is the cache-free Jacobi step (``iters=0``) stable at high rank, and does the proximal weight tame it?

Scaled PSI-LoRA with ``iters`` 0 (cache-free) and 1 (the default), at LoRA rank 16 and 64 (alpha = 2 r), lr 0.0316
and 0.1, prox 0.01 (the default) and 0.1, on the built-in base fine-tuned on ``builtin:python-reference`` for 100
steps (evaluated at 0, 50, 100), one seed: a probe for the README's advice, not the quality map (issue 25, which
holds ``iters=0`` to the map's protocol on the larger base). Every finished run is kept in
``bench/results/jacobi_high_rank.json`` (committed; a rerun resumes).

    python bench/jacobi_high_rank.py [--report]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import load_json, markdown_table, recipe_run, save_json  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "jacobi_high_rank.json")
CACHE = os.path.join(ROOT, ".cache", "psilora_ds")
GRID = {"rank": ("16", "64"), "iters": ("0", "1"), "lr": ("0.0316", "0.1"), "prox": ("0.01", "0.1")}


def run_point(rank: str, iters: str, lr: str, prox: str) -> dict:
    """One run: the eval curve, the learned update's size and stable rank, the seconds it took."""
    started = time.time()
    # (--rank_multiplier 1 and --metric_power 0.5: the defaults when these ran; they became 2 and 1 later)
    out = recipe_run(["--optim", "scaled_psilora", "--rank_multiplier", "1", "--metric_power", "0.5", "--iters", iters, "--prox", prox, "--lora_r", rank,
                      "--lora_alpha", str(2 * int(rank)), "--lr", lr, "--dataset", "builtin:python-reference",
                      "--max_steps", "100", "--eval_every", "50", "--seed", "0", "--cache_dir", CACHE], scaling=2.0)
    return {"eval": out.get("eval"), "norm": out.get("update_norm"), "srank": out.get("stable_rank"),
            "s": round(time.time() - started), "err": out.get("error")}


def report(results: dict) -> str:
    rows = []
    for rank, lr, prox in itertools.product(GRID["rank"], GRID["lr"], GRID["prox"]):
        cells = []
        for iters in GRID["iters"]:
            r = results.get(f"{rank},{iters},{lr},{prox}")
            cells.append("-" if r is None else r["err"] or
                         f"{r['eval']['50']:.3f} / **{r['eval']['100']:.3f}** (norm {r['norm']:.2f})")
        rows.append([rank, lr, prox, *cells])
    return markdown_table(["r", "lr", "prox", "iters 0: eval 50 / 100", "iters 1: eval 50 / 100"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="print the table of the cached runs, run nothing")
    args = parser.parse_args()
    results = load_json(RESULTS)
    if not args.report:
        for point in itertools.product(*GRID.values()):
            key = ",".join(point)
            if key not in results:
                results[key] = run_point(*point)
                save_json(results, RESULTS)
                print(key, results[key], flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
