"""Real-text fine-tuning, no download: eval loss after a fixed budget over an lr grid of 3 decades and
several seeds, for LoRA-AdamW, LoRA+, Riemannian LoRA (peft's optimizers), PSI-LoRA (iters 0, 1, 2),
Scaled PSI-LoRA (our defaults, the paper preset, each with and without the spectral first step) and the
SVDLoRA oracle.

* Base: a LLaMA pretrained on Python's standard-library source files (``launch/pretrain_base.py``). By default
  the shipped built-in base (``builtin:stdlib-llama``: hidden 128, 4 layers, BPE 2048, 1.1 M parameters);
  ``--hidden/--layers/--vocab_size/--pretrain_steps`` build a larger one under ``.cache/`` first.
* Task: the English language reference that ships with Python (``builtin:python-reference``, the topics of
  ``pydoc_data``), evaluated on its 8 held-out topics (all of their sequences).
* Every point is one run of ``launch/train.py``'s ``main`` (one process, fp32, LoRA r 16 / alpha 32 on all
  linear layers, cosine schedule with 10 warm-up steps, clipping 1.0), in a pool of worker processes with
  one thread each. Finished runs are remembered in ``.cache/psilora_ds/bench-finetune-real.json``.

    python bench/finetune_real.py [--steps 100] [--seeds 0 1 2] [--workers 2] [--write docs/BENCHMARKS.md --png F]

The lr window of a method: the range of log10(lr) where its mean eval loss (linear in log-lr between grid
points) is within 2% of its best mean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from multiprocessing import get_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import code_version, markdown_table, recipe_run, save_lr_figure, write_section  # noqa: E402

HALF = [1.0, 10 ** 0.5]


def grid(low_exponent: int) -> list[float]:
    """Seven lrs, half a decade apart: 10^low ... 10^(low + 3)."""
    return [round(m * 10.0 ** e, 10) for e in range(low_exponent, low_exponent + 3) for m in HALF] + \
        [10.0 ** (low_exponent + 3)]


FIRST = ["--first_step_iters", "8"]
METHODS: dict[str, tuple[list[str], list[float]]] = {  # recipe arguments, lr grid
    "LoRA-AdamW": (["--optim", "adamw"], grid(-4)),
    "LoRA+ (ratio 16)": (["--optim", "loraplus"], grid(-5)),
    "Riemannian LoRA": (["--optim", "riemannian"], grid(-4)),
    "PSI-LoRA iters 0": (["--optim", "psilora", "--iters", "0"], grid(-2)),
    "PSI-LoRA iters 1": (["--optim", "psilora", "--iters", "1"], grid(-2)),
    "PSI-LoRA iters 2": (["--optim", "psilora", "--iters", "2"], grid(-2)),
    # metric power 1 (the default since session 22): its lr unit is about a hundredth of power 1/2's
    "Scaled PSI-LoRA (defaults)": (["--optim", "scaled_psilora"], grid(-5)),
    "Scaled PSI-LoRA (defaults) + first step": (["--optim", "scaled_psilora", *FIRST], grid(-5)),
    "Scaled PSI-LoRA (paper preset, r 8)": (["--preset", "paper"], grid(-2)),  # no momentum: its best lr sits higher
    "Scaled PSI-LoRA (paper preset, r 8) + first step": (["--preset", "paper", *FIRST], grid(-2)),
    "SVDLoRA oracle (momentum 0.9)": (["--optim", "svdlora"], grid(-2)),
    "PoLAR": (["--optim", "polar"], grid(-4)),
}
BASELINES = ("LoRA-AdamW", "LoRA+ (ratio 16)", "Riemannian LoRA", "PoLAR")
CACHE = os.path.join(ROOT, ".cache", "psilora_ds")
RESULTS = os.path.join(CACHE, "bench-finetune-real.json")
TITLE = "Real-text fine-tuning (pretrained base, Python reference)"


def base_dir(args) -> str:
    if args.hidden is None:
        from psilora_ds.recipe.modeling import builtin_base

        return builtin_base()
    from psilora_ds.recipe.pretrain import PretrainConfig, pretrain_base

    cfg = PretrainConfig(hidden=args.hidden, layers=args.layers, vocab_size=args.vocab_size, steps=args.pretrain_steps,
                         corpus=args.corpus)
    path = os.path.join(CACHE, f"bench-base-{cfg.hidden}x{cfg.layers}-v{cfg.vocab_size}-s{cfg.steps}-{cfg.corpus}")
    pretrain_base(path, cfg)
    return path


def held_out_batches(base: str):
    """``(batches, config)``: the eval batches that cover all of the held-out topics (up to the last partial batch)
    and the recipe's default config on ``base``."""
    from psilora_ds.recipe.config import parse
    from psilora_ds.recipe.data import build_datasets
    from psilora_ds.recipe.modeling import build_tokenizer

    probe = parse(["--model", base, "--cache_dir", CACHE])
    _, held = build_datasets(probe, build_tokenizer(probe))
    return len(held) // probe.micro_batch_size, probe


def run_point(task: tuple[str, list[str], float, int, int, str, int]) -> tuple[str, float, int, dict]:
    """One fine-tuning run in this worker process (:func:`bench.common.recipe_run`): ``(method, lr, seed,
    {eval_loss, base_eval_loss, code})``; a diverged or refused run is a NaN point with its ``error``."""
    name, recipe_args, lr, seed, steps, base, eval_batches = task
    out = recipe_run([*recipe_args, "--model", base, "--dataset", "builtin:python-reference", "--lr", str(lr),
                      "--seed", str(seed), "--max_steps", str(steps), "--eval_every", str(steps),
                      "--eval_batches", str(eval_batches), "--cache_dir", CACHE], scaling=None)
    if "error" in out:
        return name, lr, seed, {"eval_loss": float("nan"), "error": out["error"], "code": out["code"]}
    return name, lr, seed, {"eval_loss": out["eval"][str(steps)], "base_eval_loss": out["eval"][min(out["eval"], key=int)],
                            "code": out["code"]}


def key(name: str, lr: float, seed: int, steps: int, base: str, code: str) -> str:
    """A cached run's key: the method's name and arguments, the point, the base, and the :func:`code_version` that ran
    it (a library change, such as a method's default, must not reuse the runs made before it)."""
    return json.dumps([name, METHODS[name][0], f"{lr:.6g}", seed, steps, os.path.basename(base), code])


def window(points: list[tuple[float, float]], tolerance: float = 0.02) -> tuple[int, float, float]:
    """``(index of the best point, lo lr, hi lr)``: the contiguous log-lr range around the best point where the
    piecewise linear (in log10 lr) mean loss stays within ``tolerance`` of the best (NaN: diverged)."""
    curve = [(math.log10(lr), v) for lr, v in points]
    i_best = min(range(len(curve)), key=lambda i: curve[i][1] if curve[i][1] == curve[i][1] else math.inf)
    limit = curve[i_best][1] * (1 + tolerance)

    def edge(step: int) -> float:
        i = i_best
        while 0 <= i + step < len(curve):
            (x0, y0), (x1, y1) = curve[i], curve[i + step]
            if y1 != y1:  # diverged next to it
                return x0
            if y1 > limit:  # crosses the limit between the two points
                return x0 + (x1 - x0) * (limit - y0) / (y1 - y0)
            i += step
        return curve[i][0]

    return i_best, 10 ** edge(-1), 10 ** edge(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="a subset of the method names")
    parser.add_argument("--hidden", type=int, default=None, help="build a larger base: hidden size (default: built-in)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--pretrain_steps", type=int, default=2000)
    parser.add_argument("--corpus", default="stdlib", help="the larger base's pretraining text (recipe/pretrain.py)")
    parser.add_argument("--write", default=None)
    parser.add_argument("--title", default=TITLE, help="the section --write replaces (another title for a subset of "
                        "--methods, so the full table stays)")
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    base = base_dir(args)
    with open(os.path.join(base, "pretrain.json")) as f:
        made = json.load(f)
    eval_batches, probe = held_out_batches(base)
    done = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    code = code_version()
    tasks = [(name, METHODS[name][0], lr, seed, args.steps, base, eval_batches)
             for name in args.methods for lr in METHODS[name][1] for seed in args.seeds
             if key(name, lr, seed, args.steps, base, code) not in done]
    print(f"{len(tasks)} runs to do with the library at {code} ({eval_batches} eval batches of "
          f"{probe.micro_batch_size} x {probe.max_seq_len} tokens each)", flush=True)
    with get_context("spawn").Pool(args.workers, maxtasksperchild=8) as pool:
        for n, (name, lr, seed, result) in enumerate(pool.imap_unordered(run_point, tasks), 1):
            if result["code"] != code:  # a worker ran another library than the one the key names
                raise SystemExit(f"error: psilora_ds/ or launch/train.py changed while the bench ran ({code} -> "
                                 f"{result['code']}); rerun it (the runs made before the change are kept under "
                                 "their own key)")
            done[key(name, lr, seed, args.steps, base, code)] = result
            os.makedirs(CACHE, exist_ok=True)
            with open(RESULTS, "w") as f:
                json.dump(done, f, indent=1)
            print(f"[{n}/{len(tasks)}] {name} lr {lr:g} seed {seed}: {result}", flush=True)
    report(args, base, made, done, code)


def report(args, base: str, made: dict, done: dict, code: str) -> None:
    curves, rows, base_losses = {}, [], []
    by_name: dict[str, tuple[float, float]] = {}  # best mean, lr window in decades
    for name in args.methods:
        points, cells = [], []
        for lr in METHODS[name][1]:
            vals = [done[key(name, lr, s, args.steps, base, code)] for s in args.seeds]
            losses = [v["eval_loss"] for v in vals]
            base_losses += [v["base_eval_loss"] for v in vals if "base_eval_loss" in v]
            ok = [x for x in losses if x == x and x < 20]
            mean = statistics.mean(ok) if len(ok) == len(losses) else float("nan")
            sd = statistics.stdev(ok) if len(ok) == len(losses) and len(ok) > 1 else 0.0
            points.append((lr, mean, sd))
            cells.append(f"{mean:.3f} ± {sd:.3f}" if mean == mean else
                         "failed" if any("error" in v for v in vals) else "diverged")
        curves[name] = points
        i_best, lo, hi = window([(lr, m) for lr, m, _ in points])
        cells[i_best] = f"**{cells[i_best]}**"
        by_name[name] = (points[i_best][1], math.log10(hi / lo))
        rows.append([name, *(f"{lr:.3g}: {c}" for (lr, _, _), c in zip(points, cells)), f"{by_name[name][0]:.3f}",
                     f"{points[i_best][0]:.3g}", f"{by_name[name][1]:.2f}"])
    table = markdown_table(["method", *(f"lr {i + 1}" for i in range(7)), "best mean", "best lr",
                            "lr window (decades, 2%)"], rows)
    print(table)
    family = [n for n in by_name if n not in BASELINES and not n.startswith("SVDLoRA")]  # the oracle is a reference
    base_best = min(BASELINES, key=lambda n: by_name[n][0]) if all(n in by_name for n in BASELINES) else None
    verdict = ""
    if base_best is not None and family:
        ours = min(family, key=lambda n: by_name[n][0])
        adamw_w = by_name["LoRA-AdamW"][1]
        verdict = (f"\n\nTargets: best PSI-LoRA-family mean {by_name[ours][0]:.3f} ({ours}) vs best baseline "
                   f"{by_name[base_best][0]:.3f} ({base_best}): "
                   f"{'met' if by_name[ours][0] <= by_name[base_best][0] else 'NOT met'}; its lr window "
                   f"{by_name[ours][1]:.2f} decades vs LoRA-AdamW's {adamw_w:.2f} (target >= {2 * adamw_w:.2f}): "
                   f"{'met' if by_name[ours][1] >= 2 * adamw_w else 'NOT met'}.")
    start = statistics.mean(base_losses) if base_losses else float("nan")
    print(verdict)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
        palette = plt.get_cmap("tab20")
        for i, (name, points) in enumerate(curves.items()):
            lrs, means, sds = zip(*points)
            oracle = name.startswith("SVDLoRA")
            ax.errorbar(lrs, means, yerr=sds, marker="o", ms=3, capsize=2, label=name,
                        color="black" if oracle else palette(2 * i % 20 + (2 * i // 20)),
                        ls=":" if oracle else "--" if name in BASELINES else "-")
        ax.axhline(start, color="gray", lw=0.8, ls=":", label=f"base before fine-tuning ({start:.2f})")
        ax.set_xscale("log")
        finite = [m for pts in curves.values() for _, m, _ in pts if m == m]
        ax.set_ylim(min(finite) - 0.05, min(start + 0.1, max(finite) + 0.05))
        save_lr_figure(fig, ax, f"held-out eval loss after {args.steps} steps (mean ± sd, {len(args.seeds)} seeds)",
                       args.png, legend_size=6)
    if args.write:
        body = (table + verdict + f"\n\nBase: {made['parameters'] / 1e6:.2f} M parameters (hidden "
                f"{made['config']['hidden']}, {made['config']['layers']} layers, BPE {made['config']['vocab_size']}), "
                f"pretrained {made['config']['steps']} steps on the standard library's source; held-out loss before "
                f"fine-tuning {start:.3f} on the reference topics. Each cell: mean ± sd over seeds "
                f"{', '.join(map(str, args.seeds))} (LoRA init, data order, dropout); {args.steps} steps of 8 x 128 "
                f"tokens; runs in {args.workers} worker processes of one thread each; 'diverged': a seed ended above "
                "loss 20 (or NaN); 'failed': a run raised (its error is in the results file). Library version "
                f"(bench/common.py's code_version) {code}.")
        if args.png:
            body += f"\n\n![real-text fine-tuning]({os.path.basename(args.png)})"
        command = f"python bench/finetune_real.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
        if args.methods != list(METHODS):
            command += " --methods " + " ".join(f"'{name}'" for name in args.methods)
        if args.title != TITLE:
            command += f" --title '{args.title}'"
        if args.hidden is not None:
            command += (f" --hidden {args.hidden} --layers {args.layers} --vocab_size {args.vocab_size} "
                        f"--pretrain_steps {args.pretrain_steps} --corpus {args.corpus}")
        write_section(args.write, args.title,
                      command + (f" --png {args.png}" if args.png else ""), body)


if __name__ == "__main__":
    main()
