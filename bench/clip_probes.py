"""How accurate the clipping norm's random-sign sketch is for the *total* norm over all layers, by probe count.

The sketch's "relative sd <= sqrt(2 / k)" bounds one layer's norm; clipping reads the sum over all layers, whose
errors are independent across layers. One backward pass of bench/scale.py's 0.09 B LLaMA (LoRA on every projection,
``B`` drawn N(0, 0.01) so that the gradient is not a first step's; 4 x 128 random tokens), every layer's dense
``P = Z^T X`` (the package's capture), then 200 draws of each layer's probes per probe count k:

    python bench/clip_probes.py

``--train``: what the sketch's error does to training. Real-text fine-tuning as bench/finetune_real.py runs it (the
built-in base, the Python reference topics, one process), the default Scaled PSI-LoRA clipped at 1.0 with the exact
norm (``--clip_norm_probes 0``) and with k-probe sketches (the norm several ranks take), the same seeds: the eval loss
and its difference to the exact norm's run of the same seed (same initialization and data: only the clipping's
error differs), and how many steps clipping was active in (the logged ``grad_norm`` above 1). Runs are kept in
``bench/results/clip_probes.json`` (committed; a later session resumes, under the library version that ran them):

    python bench/clip_probes.py --train [--steps 100] [--seeds 0 1 2 3 4] [--lrs 0.00316 0.01] [--write F]
"""
import argparse
import json
import os
import statistics
import sys
from multiprocessing import get_context

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import code_version, load_json, markdown_table, recipe_run, save_json, write_section  # noqa: E402
from bench.scale import VOCAB, build_model  # noqa: E402
from psilora_ds.capture import ActivationCapture  # noqa: E402
from psilora_ds.lora_layers import find_lora_layers  # noqa: E402
from psilora_ds.ops.random_probes import sign_probes  # noqa: E402


def layer_gradients() -> dict[str, torch.Tensor]:
    """Every LoRA layer's dense gradient ``P = Z^T X`` of one backward pass, from the package's own capture."""
    torch.manual_seed(0)
    model = build_model("small")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    layers = find_lora_layers(model)
    capture = ActivationCapture(layers, max_bytes=None, fold=False)
    ids = torch.randint(0, VOCAB, (4, 128), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    batches = capture.pop()
    capture.remove()
    return {layers[idx].name: batch.P().double() for idx, batch in sorted(batches.items())}


def norm_error_table() -> None:
    grads = layer_gradients()
    exact = [float(P.square().sum()) for P in grads.values()]
    total = sum(exact)
    rows = []
    for k in (4, 8, 16, 32):
        total_err, layer_sd = [], []
        for draw in range(200):
            est = [float((P @ sign_probes(P.shape[1], k, 10_000 * draw + i, dtype=torch.float64, device="cpu"))
                         .square().sum()) / k for i, P in enumerate(grads.values())]
            total_err.append((sum(est) / total) ** 0.5 - 1)
            layer_sd.append(statistics.pstdev([(e / x) ** 0.5 - 1 for e, x in zip(est, exact)]))
        rows.append([k, f"{statistics.pstdev(total_err):.4f}", f"{max(map(abs, total_err)):.4f}",
                     f"{statistics.mean(layer_sd):.3f}", f"{(2 / k) ** 0.5:.3f}"])
    print(f"{len(grads)} LoRA layers; the largest holds {max(exact) / total:.1%} of ||G||^2\n")
    print(markdown_table(["probes k", "total norm: relative error sd", "largest absolute error of 200 draws",
                          "one layer's norm: relative error sd", "per-layer bound sqrt(2/k)"], rows))


CACHE = os.path.join(ROOT, ".cache", "psilora_ds")
RESULTS = os.path.join(ROOT, "bench", "results", "clip_probes.json")
PROBES = (0, 8, 16, 32)  # 0: the exact norm
TITLE = "Clipping-norm sketch: its probe count in training"


def train_point(task: tuple[int, float, int, int, int]) -> tuple[tuple[int, float, int, int], dict]:
    """One fine-tuning run in this worker process: eval loss, and the steps whose logged gradient norm exceeds the
    clipping threshold (1.0)."""
    probes, lr, seed, steps, eval_batches = task
    out = recipe_run(["--optim", "scaled_psilora", "--model", "builtin:stdlib-llama", "--dataset",
                      "builtin:python-reference", "--lr", str(lr), "--seed", str(seed), "--max_steps", str(steps),
                      "--eval_every", str(steps), "--eval_batches", str(eval_batches), "--max_grad_norm", "1.0",
                      "--clip_norm_probes", str(probes), "--cache_dir", CACHE], scaling=None, series=("grad_norm",))
    if "error" in out:
        raise SystemExit(f"error: the run (probes {probes}, lr {lr}, seed {seed}) stopped: {out['error']}")
    norms = out["series"]["grad_norm"]
    return (probes, lr, seed, steps), {"eval_loss": out["eval"][str(steps)], "code": out["code"],
                                       "clipped_steps": sum(1 for g in norms if g is not None and g > 1.0),
                                       "steps_with_norm": sum(1 for g in norms if g is not None)}


def train_study(args) -> None:
    """Every (probe count, lr, seed) run, cached; then the table."""
    from bench.finetune_real import held_out_batches

    from psilora_ds.recipe.modeling import builtin_base

    eval_batches, _ = held_out_batches(builtin_base())
    code = code_version()
    done = load_json(RESULTS)

    def key(probes, lr, seed):
        return json.dumps([probes, f"{lr:.6g}", seed, args.steps, code])

    tasks = [(k, lr, s, args.steps, eval_batches) for lr in args.lrs for k in PROBES for s in args.seeds
             if key(k, lr, s) not in done]
    print(f"{len(tasks)} runs to do with the library at {code}", flush=True)
    with get_context("spawn").Pool(args.workers, maxtasksperchild=8) as pool:
        for n, ((k, lr, s, _), result) in enumerate(pool.imap_unordered(train_point, tasks), 1):
            if result["code"] != code:
                raise SystemExit(f"error: psilora_ds/ changed while the bench ran ({code} -> {result['code']}); rerun")
            done[key(k, lr, s)] = result
            save_json(done, RESULTS)
            print(f"[{n}/{len(tasks)}] probes {k} lr {lr:g} seed {s}: {result}", flush=True)
    rows = []
    for lr in args.lrs:
        exact = {s: done[key(0, lr, s)]["eval_loss"] for s in args.seeds}
        for k in PROBES:
            runs = [done[key(k, lr, s)] for s in args.seeds]
            losses = [r["eval_loss"] for r in runs]
            diffs = [r["eval_loss"] - exact[s] for r, s in zip(runs, args.seeds)]
            clipped = statistics.mean(r["clipped_steps"] / max(1, r["steps_with_norm"]) for r in runs)
            rows.append([f"{lr:g}", "exact" if k == 0 else k,
                         f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}",
                         "-" if k == 0 else f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f}",
                         "-" if k == 0 else f"{max(map(abs, diffs)):.4f}", f"{clipped:.0%}"])
    table = markdown_table(["lr", "clipping norm (probes)", f"eval loss (mean ± sd, {len(args.seeds)} seeds)",
                            "minus the exact norm's, same seed (mean ± sd)", "largest absolute difference",
                            "steps clipped"], rows)
    print(table)
    if args.write:
        command = (f"python bench/clip_probes.py --train --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
                   f"--lrs {' '.join(f'{lr:g}' for lr in args.lrs)}")
        body = (f"{table}\n\nThe default Scaled PSI-LoRA (`--optim scaled_psilora`) on the built-in "
                f"base and the Python reference topics, one process, {args.steps} steps of 8 x 128 tokens, clipping at "
                "1.0 by the exact norm or by a k-probe sketch (`--clip_norm_probes k`, the norm several ranks take); "
                f"library version {code}.")
        write_section(args.write, TITLE, command, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="the training study (else the norm's error table)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.00316, 0.01])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", default=None, help="replace this section of a markdown file (docs/BENCHMARKS.md)")
    args = parser.parse_args()
    if args.train:
        train_study(args)
    else:
        norm_error_table()


if __name__ == "__main__":
    main()
