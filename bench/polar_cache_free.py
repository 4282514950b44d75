"""PoLAR cache-free (its default: the products P A^T, B^T P accumulated in the hooks, the clipping norm from the
32-probe sketch) against PoLAR on the cached rows (``--cache_free false``: the exact one-process norm), on the README's
default job (the built-in base, ``builtin:python-reference``, 300 steps, clipping 1.0, which is active at every step
there) at PoLAR's best lr on that base (0.0316), over ``--seeds``: the held-out loss per seed, the paired difference's
mean and sd, and the training seconds.

Every finished run is kept in ``bench/results/polar_cache_free.json`` (committed; a later session resumes);
``--workers`` runs go in parallel, one thread each.

    python bench/polar_cache_free.py [--seeds 0 1 2 3 4 5 6 7] [--workers 2] [--write docs/BENCHMARKS.md]
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
from bench.common import load_json, markdown_table, recipe_run, save_json, write_section  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "polar_cache_free.json")
CACHE = os.path.join(ROOT, ".cache", "psilora_ds")
POLAR = ["--optim", "polar", "--lr", "0.0316"]
RUNS = {"cache-free (default)": POLAR, "rows kept": [*POLAR, "--cache_free", "false"]}
SECTION = "PoLAR: cache-free against rows"


def run_point(task: tuple[str, int]) -> tuple[str, int, dict]:
    name, seed = task
    return name, seed, recipe_run([*RUNS[name], "--seed", str(seed), "--cache_dir", CACHE], scaling=None)


def key(name: str, seed: int) -> str:
    return json.dumps([name, RUNS[name], seed])


def report(results: dict, seeds: list[int]) -> str:
    """One row per seed with both runs, then the mean +- sd of each and of the paired difference."""
    rows, pairs = [], []
    for seed in seeds:
        got = [results.get(key(name, seed)) for name in RUNS]
        if not all(g and "eval" in g for g in got):
            continue
        free, kept = (g["eval"][max(g["eval"], key=int)] for g in got)
        seconds = [g["train_seconds"][max(g["train_seconds"], key=int)] for g in got]
        pairs.append((free, kept, *seconds))
        rows.append([seed, f"{free:.4f}", f"{kept:.4f}", f"{free - kept:+.4f}",
                     f"{seconds[0]:.0f}", f"{seconds[1]:.0f}"])
    if len(pairs) >= 2:
        cols = list(zip(*pairs))
        diff = [a - b for a, b in zip(cols[0], cols[1])]
        rows.append([f"mean +- sd ({len(pairs)} seeds)",
                     *(f"{statistics.mean(c):.4f} +- {statistics.stdev(c):.4f}" for c in (cols[0], cols[1], diff)),
                     f"{statistics.mean(cols[2]):.0f}", f"{statistics.mean(cols[3]):.0f}"])
    return markdown_table(["seed", "eval loss, cache-free", "eval loss, rows kept", "difference",
                           "train s, cache-free", "train s, rows kept"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", default=None, help="write the table into this markdown file's section")
    args = parser.parse_args()
    results = load_json(RESULTS)
    todo = [(n, s) for s in args.seeds for n in RUNS if key(n, s) not in results]
    print(f"{len(todo)} runs to do ({2 * len(args.seeds) - len(todo)} cached in {RESULTS})", flush=True)
    with get_context("spawn").Pool(args.workers) as pool:
        for name, seed, result in pool.imap_unordered(run_point, todo):
            results[key(name, seed)] = result
            save_json(results, RESULTS)  # each finished run at once: an interrupted bench resumes here
            print(f"{name} seed {seed}: {result.get('eval', result.get('error'))}", flush=True)
    text = report(results, args.seeds)
    print(text)
    if args.write:
        write_section(args.write, SECTION, "python bench/polar_cache_free.py " + " ".join(sys.argv[1:]), text +
                      "\n\nThe training seconds are the sum of the logged step times of two runs going side by side "
                      "on the 2-core machine (one thread each): a pair's figures compare, other sections' do not.")


if __name__ == "__main__":
    main()
