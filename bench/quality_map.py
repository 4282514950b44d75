"""Where PSI-LoRA wins (issue 25): the quality map on a larger base, longer runs, two ranks and two real domains,
every method's lr tuned the same way.

* Base: a LLaMA of hidden 256, 6 layers, BPE 4096 (5.6 M parameters, 5x the built-in base) pretrained by
  ``launch/pretrain_base.py`` on the standard library's source files (``--corpus stdlib``) and committed under
  ``bench/bases/`` (11 MB, bf16): a base rebuilt on another machine differs (its stdlib has other files, its CPU
  other rounding), and the first map's base was lost that way (its runs: ``bench/results/quality_map_base565.json``).
  Its record is checked against the one in the results, and every run's step-0 held-out loss against the cell's
  first one (same base, same held-out split: a machine whose GNU manuals differ is refused).
* Cells: ``builtin:python-reference`` at r 16 and r 64, ``builtin:gnu-manuals`` at r 16 (alpha = 2 r, all linear
  layers); ``--steps`` (300) steps, cosine schedule with 10 warm-up steps, clipping 1.0, evaluated every 50 steps on
  the fixed held-out split. An extension after all of it (attempts included): ``python-reference`` at r 128 (alpha 256),
  LoRA-AdamW, LoRA+, PoLAR and the default Scaled PSI-LoRA (and the former default) only, each bracket starting at
  its best at r 64.
* Methods: LoRA-AdamW, LoRA+, the default Scaled PSI-LoRA (rank-2r momentum since session 20, K-FAC metric power 1
  since session 22) and the two former defaults (power 1/2 with the 2 r and the rank-r momentum), Scaled PSI-LoRA
  ``iters=0`` (cache-free; power 1/2, rank r), the SVDLoRA
  oracle (momentum 0.9), PoLAR, Scaled PSI-LoRA with ``metric="adafactor"`` (ours), and full fine-tuning with AdamW, the ceiling (``bench/full_finetune.py``: every
  weight, on the recipe's data, schedule, clipping and evaluation; in the r 16 cells only, it has no rank). A diagnostic
  on python-reference (r 16 and 64) and gnu-manuals r 16: the SVDLoRA oracle with Adam's direction (a full Adam step projected to rank r,
  METHOD.md section 5; 3 seeds at its best, no lr window).
* lr search, per cell and method: seed 0 on a grid a third of a decade apart (10^(k/3)), from three points around
  the method's starting guess, extended until the best is interior; then seeds 1 and 2 at the best and its two
  neighbours; last (not for the attempts), seed 0 outward until the loss is 2% above the best on both sides (the lr
  window, as bench/finetune_real.py measures it). A point is one run; the best is the lowest mean over the seeds run.

Every finished run is written at once to ``bench/results/quality_map.json`` (committed as the map advances: a later
session resumes where this one stopped). ``--workers`` runs go in parallel, one thread each.

    python bench/quality_map.py [--workers 2] [--cells python-reference:16 ...] [--methods ...] [--report]
    python bench/quality_map.py --step_times   # on a quiet machine: each method's s/step, the time axis of the figure
    python bench/quality_map.py --steps 600    # the horizon: LONG_METHODS in LONG_CELL over twice the steps

The horizon (``--steps`` other than 300): on the built-in base over 600 steps the default led LoRA-AdamW to step 300
and ended 2.1% behind (bench/horizon.py, one seed); ``--steps 600`` asks the same of the larger base, where the map
finds it level at 300 steps: LoRA-AdamW, LoRA+, the default and PoLAR in python-reference r 16, each bracket starting at
its best at 300 steps, 3 seeds around the best, no lr windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import load_json, machine, markdown_table, recipe_run, save_json, write_section  # noqa: E402
from bench.finetune_real import window  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "quality_map.json")
FULL = "Full fine-tuning (AdamW)"
BASELINE = "LoRA-AdamW"  # the reference of ratios (lr transfer, lr window, the step-time round: timed first and last)
ADAM_ORACLE = "SVDLoRA oracle, Adam direction"
CACHE = os.path.join(ROOT, ".cache", "psilora_ds")
BASE = dict(hidden=256, layers=6, vocab_size=4096, steps=2000, corpus="stdlib")
BASE_DIR = os.path.join(ROOT, "bench", "bases", "stdlib-256x6-v4096")
# in the order they run: r 64 second, the setting where a projected full step is most likely to win (full fine-tuning
# leads every r 16 method by 0.05 on python-reference)
CELLS = ("python-reference:16", "python-reference:64", "gnu-manuals:16")
# an extension, run after everything in CELLS (the attempts included): rank 128 on python-reference, where the trend
# from r 16 (the default 0.3% behind LoRA-AdamW) to r 64 (level with the best baselines, its update's stable rank
# up from 4.7 to 8.5) points if PSI-LoRA wins anywhere in this grid; the default and the former one (SCOPES) against
# the three baselines only, each bracket starting at the method's best at r 64 (START_FROM); means only, no lr
# windows (needed)
EXTENSION = "python-reference:128"
STEPS = 300  # the map's horizon; runs of other lengths (the horizon check) start from their method's best here
ALL_CELLS = (*CELLS, EXTENSION)
START_FROM = {EXTENSION: "python-reference:64"}
# Scaled PSI-LoRA's defaults changed twice while the map ran (issue 25 item 5): the momentum's rank became 2 r in
# session 20 (rank_multiplier 2 ended below rank r in every cell, at the same lr), and the K-FAC metric's power became 1
# in session 22 (with the 2 r momentum, below or level with power 1/2 in every cell, each at its own best lr). The
# runs made before keep arguments that reproduce them: every Scaled PSI-LoRA setting but the default names its momentum
# rank and metric power (or its metric), appended last as the results' keys were renamed, once per change;
# "Scaled PSI-LoRA (defaults)" holds the runs of power 1 with the 2 r momentum, whatever they were called then.
SCALED = ["--optim", "scaled_psilora"]
RANK_R = ["--rank_multiplier", "1"]  # (last, then MP_HALF: the keys were renamed by appending them)
MP_HALF = ["--metric_power", "0.5"]
FORMER_DEFAULT = "Scaled metric_power 0.5 rank_multiplier 2"  # the default of sessions 20-21
RANK_R_DEFAULT = "Scaled metric_power 0.5 rank_multiplier 1"  # the default before; the attempts vary it
ITERS_0 = "Scaled iters 0 (metric_power 0.5, rank_multiplier 1)"  # cache-free
# name -> (recipe arguments, starting lr guess: the built-in base's best at 100 steps)
METHODS: dict[str, tuple[list[str], float]] = {
    "LoRA-AdamW": (["--optim", "adamw"], 1e-2),
    "LoRA+ (ratio 16)": (["--optim", "loraplus"], 1e-3),
    "Scaled PSI-LoRA (defaults)": (SCALED, 1e-3),
    FORMER_DEFAULT: ([*SCALED, "--rank_multiplier", "2", *MP_HALF], 1e-1),
    RANK_R_DEFAULT: ([*SCALED, *RANK_R, *MP_HALF], 1e-1),
    ITERS_0: ([*SCALED, "--iters", "0", *RANK_R, *MP_HALF], 1e-1),
    "SVDLoRA oracle (momentum 0.9)": (["--optim", "svdlora"], 1e-1),
    "PoLAR": (["--optim", "polar"], 1e-2),
    # ours (METHOD.md section 4): Adafactor's factored second moment of the full gradient as the metric; in every
    # cell (its lr from a one-seed probe on the built-in base, 3.16e-3 best of 1e-3..3.16e-2); power 1/2, its default
    "Scaled PSI-LoRA metric adafactor": ([*SCALED, "--metric", "adafactor", *RANK_R, *MP_HALF], 3e-3),
    FULL: (["--optim", "adamw"], 1e-3),
    # a diagnostic (METHOD.md section 5): the projection of a full Adam step, the ceiling of projected dense steps with
    # Adam's direction (what the Adafactor metric approaches); its scope below
    ADAM_ORACLE: (["--optim", "svdlora_adam"], 2e-3),
}
# Attempts to win (issue 25, item 3): variations of the rank-r, power-1/2 default of session 19 (RANK_R_DEFAULT;
# the names say what differs from it, the arguments all of it), each tuned by the same protocol, on the cell where it
# is furthest behind (gnu-manuals, r 16), after the core map's methods there; they start at RANK_R_DEFAULT's best lr
# in the cell (start_k; STARTS_AT names another method's), the guess below only where it has not run there. Two that
# won became the default: rank_multiplier 2 (session 20), then metric_power 1 with it (session 22; its runs, in every
# cell, are the default's now).
DEFAULT_PSI = "Scaled PSI-LoRA (defaults)"
DEFAULT_ITERS_0 = "Scaled iters 0 (metric_power 1, rank_multiplier 2)"  # the default's cache-free path
ATTEMPTS_CELL = "gnu-manuals:16"
ATTEMPTS: dict[str, tuple[list[str], float]] = {
    "Scaled momentum_prox 0.2": ([*SCALED, "--momentum_prox", "0.2", *RANK_R, *MP_HALF], 2e-2),
    "Scaled metric_power 0.25": ([*SCALED, "--metric_power", "0.25", *RANK_R], 2e-2),
    "Scaled metric_power 1": ([*SCALED, "--metric_power", "1.0", *RANK_R], 2e-2),
    "Scaled damping 1e-4": ([*SCALED, "--damping", "1e-4", *RANK_R, *MP_HALF], 2e-2),
    # the momentum's rank again (session 19: rank_multiplier 2 ended 1.1% below rank r on gnu-manuals, 3 seeds, the
    # largest gain of any attempt): whether the trend goes on
    "Scaled metric_power 0.5 rank_multiplier 4": ([*SCALED, "--rank_multiplier", "4", *MP_HALF], 2e-2),
    "Scaled no first step": ([*SCALED, "--first_step_iters", "null", *RANK_R, *MP_HALF], 2e-2),
    # the proximal weight lam = lr * prox (METHOD.md section 2), ten times below the default 1e-2: whether it holds the
    # update's size back (the lead: Scaled's learned ||B A|| about half AdamW's; on the built-in base, one seed, prox
    # 1e-3 and 0 changed the 600-step end by -0.1% / +0.05%: bench/horizon.py)
    "Scaled prox 1e-3": ([*SCALED, "--prox", "1e-3", *RANK_R, *MP_HALF], 2e-2),
    # the two levers that moved, together (session 20: metric_power 1 ended 0.7% below rank r, rank 4 r 0.6% below
    # 2 r, each alone): K-FAC's full inverse metric with the wider momenta, from metric_power 1's best lr (STARTS_AT);
    # with 2 r it is the default now
    "Scaled metric_power 1 rank_multiplier 4": ([*SCALED, "--metric_power", "1.0", "--rank_multiplier", "4"], 2e-3),
    # the cache-free Jacobi path as users now get it (the default's power 1 and 2 r momentum, iters 0): the map's
    # ITERS_0 ran the rank-r, power-1/2 setting; r 16 on both domains, from the default's best lr (STARTS_AT)
    DEFAULT_ITERS_0: ([*SCALED, "--iters", "0", "--rank_multiplier", "2", "--metric_power", "1.0"], 1e-3),
}
METHODS.update(ATTEMPTS)
# an attempt's bracket starts at the best lr in its cell of the first method named here that has one
# (RANK_R_DEFAULT's where none is named): rank 4 r at power 1 settled on gnu-manuals from metric_power 1's best; in
# python-reference:16, where metric_power 1 alone never ran, it starts at the default's (the same power, so the same
# lr unit)
STARTS_AT: dict[str, tuple[str, ...]] = {
    **{name: ("Scaled metric_power 1", DEFAULT_PSI) for name in ATTEMPTS if name.startswith("Scaled metric_power 1 ")},
    DEFAULT_ITERS_0: (DEFAULT_PSI,)}
# the keys' renamings when a default changed (old name -> new name; the arguments are the new name's in METHODS)
RENAMED_IN_SESSION_22 = {"Scaled PSI-LoRA (defaults)": FORMER_DEFAULT, "Scaled rank_multiplier 1": RANK_R_DEFAULT,
                         "Scaled PSI-LoRA iters 0": ITERS_0,
                         "Scaled rank_multiplier 4": "Scaled metric_power 0.5 rank_multiplier 4",
                         "Scaled metric_power 1 rank_multiplier 2": DEFAULT_PSI}


@dataclass(frozen=True)
class Scope:
    """Where the map runs a method and how far it tunes it."""

    cells: tuple[str, ...] = CELLS
    window: bool = True  # after the seeds, seed 0 outward to the lr window's edges
    after_core: bool = False  # runs once every core method is done in the cell (the attempts)


# full fine-tuning has no rank (r 16 cells only); the diagnostic and the attempts take 3 seeds at their best, no window
SCOPES: dict[str, Scope] = {
    FULL: Scope(cells=tuple(c for c in CELLS if c.endswith(":16"))),
    # in every cell (gnu-manuals too: whether the projected step or its gradient-descent direction loses there)
    ADAM_ORACLE: Scope(window=False),
    **{name: Scope(cells=(ATTEMPTS_CELL,), window=False, after_core=True) for name in ATTEMPTS},
    # rank 4 r went on from 2 r on gnu-manuals (3.7053 +- 0.0041 against 3.7276 +- 0.0027): whether it does near the
    # base's data too, before the extension (at r 64 it would be the layers' full width)
    "Scaled metric_power 0.5 rank_multiplier 4": Scope(cells=("gnu-manuals:16", "python-reference:16"), window=False,
                                                       after_core=True),
    DEFAULT_ITERS_0: Scope(cells=("python-reference:16", "gnu-manuals:16"), window=False, after_core=True),
    # rank 4 r at power 1 (the default's power; 3.6884 +- 0.0090 against the default's 3.7048 +- 0.0102 on
    # gnu-manuals): whether it gains near the base's data too, which would make it the default (session 23)
    "Scaled metric_power 1 rank_multiplier 4": Scope(cells=("gnu-manuals:16", "python-reference:16"), window=False,
                                                     after_core=True),
    # the default (metric power 1 since session 22) and the former one in every cell, the extension's brackets
    # starting at their r 64 bests (START_FROM); the default's windows were measured while it was an attempt
    **{name: Scope(cells=ALL_CELLS) for name in ("LoRA-AdamW", "LoRA+ (ratio 16)", "PoLAR", DEFAULT_PSI,
                                                 FORMER_DEFAULT)},
}


def scope(method: str) -> Scope:
    return SCOPES.get(method, Scope())


def runs_in(method: str, cell: str) -> bool:
    """Whether the map runs ``method`` in ``cell``."""
    return cell in scope(method).cells


def windowed(method: str, cell: str, steps: int = STEPS) -> bool:
    """Whether the map measures ``method``'s lr window in ``cell``: not for the attempts and the diagnostic, not in
    the extension cell (its means only: the windows would cost ~12 runs, 30 minutes, and target 3 is the issue's
    cells') and not at another horizon than the map's 300 steps."""
    return scope(method).window and cell != EXTENSION and steps == STEPS


SEEDS = (0, 1, 2)
# the lr window (bench/finetune_real.py's): within 2% of the best; the grid is extended (seed 0) until both edges
# are crossed, at most WINDOW_REACH points (a decade and a third) from the best
WINDOW, WINDOW_REACH = 0.02, 4
EVAL_EVERY = 50
HORIZON_NOTE = ("The map's base and protocol over more steps (cosine schedule over the whole run): LoRA-AdamW, LoRA+, "
                "the default Scaled PSI-LoRA and PoLAR in python-reference r 16, each bracket starting at its best lr at "
                "300 steps, 3 seeds around the best, no lr windows. The question (bench/horizon.py): on the built-in "
                "base over 600 steps the default led LoRA-AdamW to step 300 and ended 2.1% behind (one seed). The "
                "Python reference's training split is about 121k tokens of this base's BPE: the map's 300 steps of "
                "1024 tokens are 2.5 epochs, 600 steps 5.1, so this measures the many-epoch regime of a small "
                "fine-tuning set, where held-out loss stops falling.")
LONG_CELL = "python-reference:16"
LONG_METHODS = (BASELINE, "LoRA+ (ratio 16)", DEFAULT_PSI, "PoLAR")  # PoLAR since session 23: target 2's third baseline


GRID = range(-15, 4)  # the grid points k any run may sit at: lr 1e-5 .. 10 (lr_of)


def lr_of(k: int) -> float:
    """The grid: a third of a decade apart."""
    return float(f"{10 ** (k / 3):.4g}")


def k_of(lr: float) -> int:
    return round(3 * math.log10(lr))


def base_record() -> dict:
    """The committed base's pretraining record (its config must be :data:`BASE`)."""
    path = os.path.join(BASE_DIR, "pretrain.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: the map's base is missing from {BASE_DIR}; restore it with git (it is committed)")
    with open(path) as f:
        made = json.load(f)
    if any(made["config"][k] != v for k, v in BASE.items()):
        raise SystemExit(f"error: the base in {BASE_DIR} was not pretrained with {BASE}")
    return made


def check_step0(results: dict, cell: str, result: dict) -> None:
    """Every run of a cell starts from the same base on the same held-out split: its step-0 loss is the cell's."""
    start = result.get("eval", {}).get("0")
    if start is None:
        return
    first = results.setdefault("_step0", {}).setdefault(cell, start)
    if abs(first - start) > 1e-4:
        raise SystemExit(f"error: {cell}'s step-0 held-out loss is {start:.5f} here but {first:.5f} in the results: "
                         f"this machine's data differ from the map's (see recipe/system_text.py); run the map where "
                         f"they match")


def save_results(results: dict, own: tuple[str, ...] = ()) -> None:
    """Write ``results`` to :data:`RESULTS` without losing what another map process wrote (the main map, the horizon
    check and a step-time round may run side by side): under a lock, the file's runs that ``results`` lacks join it
    (a run never changes once written), and its ``_`` records (step-0 losses, step times) replace this process's
    copies entry by entry, except those named in ``own``, which this process has just made."""
    import fcntl

    with open(RESULTS + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, value in load_json(RESULTS).items():
            if not name.startswith("_"):
                results.setdefault(name, value)
            elif name not in own:
                results[name] = {**results.get(name, {}), **value} if isinstance(value, dict) else value
        save_json(results, RESULTS)


def key(cell: str, method: str, k: int, seed: int, steps: int) -> str:
    return json.dumps([cell, method, METHODS[method][0], lr_of(k), seed, steps])


def run_point(task: tuple[str, str, int, int, int, str]) -> tuple[str, dict]:
    cell, method, k, seed, steps, base = task
    domain, rank = cell.split(":")
    start = time.time()
    argv = [*METHODS[method][0], "--model", base, "--dataset", f"builtin:{domain}", "--lora_r", rank,
            "--lora_alpha", str(2 * int(rank)), "--lr", str(lr_of(k)), "--seed", str(seed),
            "--max_steps", str(steps), "--eval_every", str(EVAL_EVERY), "--cache_dir", CACHE]
    if method == FULL:
        from bench.full_finetune import full_finetune_run

        result = full_finetune_run(argv)
    else:
        result = recipe_run(argv, scaling=2.0)
    result["wall_seconds"] = round(time.time() - start, 1)
    return key(cell, method, k, seed, steps), result


def priority(cell: str, method: str, order: dict[str, int]) -> tuple[int, int]:
    """Where a run goes in the queue: the issue's cells' core methods, then the attempts, then the extension cell;
    cells in order within each."""
    tier = 2 if cell == EXTENSION else int(scope(method).after_core)
    return tier, order[cell]


def schedule(results: dict, cells: list[str], methods: list[str], steps: int,
             busy: set[tuple[str, str]]) -> list[tuple[str, str, int, int]]:
    """The runs ``(cell, method, k, seed)`` to queue now, in the order to run them: for every ``(cell, method)`` with
    nothing queued or running (``busy``), all the runs its protocol asks for next. A method's protocol reads only its own
    finished runs, so its decisions are those of rounds in which every method waits for the others; the map just never
    leaves a core idle at the end of a round. In :func:`priority`'s order (methods in order within a cell)."""
    order = {cell: i for i, cell in enumerate(cells)}
    runs = [(cell, m, k, s) for cell in cells for m in methods
            if runs_in(m, cell) and (cell, m) not in busy for k, s in needed(results, cell, m, steps)]
    return sorted(runs, key=lambda t: priority(t[0], t[1], order))


def run_map(results: dict, cells: list[str], methods: list[str], steps: int, base: str, workers: int,
            max_batches: int) -> None:
    """Run :func:`schedule`'s runs on ``workers`` processes (one thread each) until no method needs more, each finished
    run written to the results file at once (an interrupted map resumes there)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    queue: list[tuple[str, str, int, int]] = []
    running: dict = {}  # future -> its task
    batches: dict[tuple[str, str], int] = {}
    order = {cell: i for i, cell in enumerate(cells)}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        while True:
            busy = {(t[0], t[1]) for t in [*queue, *running.values()]}
            new = [t for t in schedule(results, cells, methods, steps, busy)
                   if batches.get((t[0], t[1]), 0) < max_batches]
            for cell_method in {(t[0], t[1]) for t in new}:
                batches[cell_method] = batches.get(cell_method, 0) + 1
            if new:
                print(f"queued {len(new)}: " + ", ".join(sorted({f'{c} {m}' for c, m, _, _ in new})), flush=True)
            queue = sorted(queue + new, key=lambda t: priority(t[0], t[1], order))  # (stable: method order)
            while queue and len(running) < workers:
                cell, method, k, seed = queue.pop(0)
                running[pool.submit(run_point, (cell, method, k, seed, steps, base))] = (cell, method, k, seed)
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cell = running.pop(future)[0]
                point, result = future.result()
                check_step0(results, cell, result)
                results[point] = result
                save_results(results)
                print(point, result.get("eval", {}).get(str(steps), result.get("error")), result.get("wall_seconds"),
                      flush=True)


PROBE_STEPS, PROBE_FROM = 50, 25  # the step-time probe: steps run, and the last untimed one (evaluated there)


def step_time_probe(task: tuple[str, str, str]) -> tuple[str, str, float]:
    """Seconds per training step of ``method`` at rank ``rank`` on the map's base (one thread, steps PROBE_FROM+1 to
    PROBE_STEPS: after the warm-up and the spectral first step), at its starting lr (the time does not depend on it).
    A run's ``train_seconds`` sum the step times only (evaluation not included)."""
    rank, method, base = task
    argv = [*METHODS[method][0], "--model", base, "--dataset", "builtin:python-reference", "--lora_r", rank,
            "--lora_alpha", str(2 * int(rank)), "--lr", str(METHODS[method][1]), "--seed", "0",
            "--max_steps", str(PROBE_STEPS), "--eval_every", str(PROBE_STEPS - PROBE_FROM), "--cache_dir", CACHE]
    if method == FULL:
        from bench.full_finetune import full_finetune_run

        result = full_finetune_run(argv)
    else:
        result = recipe_run(argv, scaling=2.0)
    seconds = result["train_seconds"]
    return rank, method, (seconds[str(PROBE_STEPS)] - seconds[str(PROBE_FROM)]) / (PROBE_STEPS - PROBE_FROM)


def measure_step_times(results: dict, cells: list[str], methods: list[str], base: str, rounds: int = 1) -> None:
    """``results["_step_seconds"][rank][method]``: each method's seconds per step on a quiet machine, one run at a
    time, the fastest of ``rounds`` rounds in this one process (LoRA-AdamW first and again last in each rank of each
    round: the largest ratio of its two times, the machine's drift, is kept in ``results["_step_seconds_round"]`` with
    the machine, date and rounds). The time axis of time-to-quality, which the map's own ``train_seconds`` cannot give
    while its runs share the cores. The rounds replace the stored times only once complete, so the axis never mixes
    machines or sessions."""
    ranks = sorted({cell.split(":")[1] for cell in cells}, key=int)
    times: dict[str, dict[str, float]] = {}
    again: dict[str, float] = {}
    for _ in range(rounds):
        for rank in ranks:
            todo = [m for m in methods if runs_in(m, f"python-reference:{rank}")]
            todo.sort(key=lambda m: m != BASELINE)  # the baseline first (stable: the others in order)
            first: float | None = None
            for method in todo + ([BASELINE] if BASELINE in todo else []):
                _, _, seconds = step_time_probe((rank, method, base))
                print(f"r {rank} {method}: {seconds:.3f} s/step", flush=True)
                if method == BASELINE and first is not None:  # timed again: keep the drift furthest from 1
                    again[rank] = max(again.get(rank, 1.0), round(seconds / first, 3), key=lambda d: abs(d - 1))
                    continue
                if method == BASELINE:
                    first = seconds
                best = times.setdefault(rank, {}).get(method, math.inf)
                times[rank][method] = round(min(best, seconds), 4)
    results["_step_seconds"] = times
    results["_step_seconds_round"] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rounds": rounds,
                                      "baseline_again": again}
    save_results(results, own=("_step_seconds", "_step_seconds_round"))


def step_times_note(results: dict) -> str:
    """Where the quiet step times come from, for the report."""
    made = results.get("_step_seconds_round")
    if made is None:
        return ("quiet step times from several sessions (machines about 1.15x apart): rerun `--step_times` for one "
                "round")
    drift = ", ".join(f"r {rank} {ratio:.3f}x" for rank, ratio in made["baseline_again"].items())
    rounds = made.get("rounds", 1)
    return (f"quiet step times from {'one round' if rounds == 1 else f'the fastest of {rounds} rounds'} on "
            f"{made['date']} ({made['machine']}); LoRA-AdamW timed again at a rank's end: {drift} its first time"
            + ("" if rounds == 1 else " (the furthest from 1 over the rounds)"))


def quiet_seconds(results: dict, cell: str, method: str, step: int) -> float | None:
    """Training seconds to ``step`` at the quiet step time (None: not measured)."""
    per_step = results.get("_step_seconds", {}).get(cell.split(":")[1], {}).get(method)
    return None if per_step is None else per_step * step


def final_loss(result: dict | None, steps: int) -> float | None:
    """The final eval loss of a finished run (NaN when it diverged or was refused; None when not run)."""
    if result is None:
        return None
    return result.get("eval", {}).get(str(steps), math.nan)


def curve(results: dict, cell: str, method: str, steps: int, seeds: tuple[int, ...] = SEEDS,
          above_base_diverged: bool = True) -> dict[int, list[float]]:
    """``{k: [final eval loss per seed run]}``; a run that ends above the cell's step-0 loss (worse than the base it
    started from: diverged, even where the loss stayed finite) counts as ``inf`` (unless ``above_base_diverged`` is
    False: the lr window interpolates the loss itself), so the protocol neither takes it for a best nor runs seeds
    around it."""
    start = results.get("_step0", {}).get(cell, math.inf) if above_base_diverged else math.inf
    out: dict[int, list[float]] = {}
    for seed in seeds:
        for k in GRID:
            loss = final_loss(results.get(key(cell, method, k, seed, steps)), steps)
            if loss is not None:
                out.setdefault(k, []).append(loss if loss <= start else math.inf)
    return out


def mean_or_inf(losses: list[float]) -> float:
    m = statistics.mean(losses)
    return m if math.isfinite(m) else math.inf


def start_k(results: dict, cell: str, method: str, steps: int) -> int:
    """Where a method's bracket starts: at another horizon than :data:`STEPS`, at its own best at STEPS in the cell; in
    a cell of :data:`START_FROM` at its own best in the cell named there; else
    an attempt (a variation of :data:`RANK_R_DEFAULT`) at its best lr in the cell (or that of the method
    :data:`STARTS_AT` names first that has one there); every other method
    (or where that best is not in yet) at its guess in :data:`METHODS`."""
    if steps != STEPS:
        best = best_point(results, cell, method, STEPS)
    elif cell in START_FROM:
        best = best_point(results, START_FROM[cell], method, steps)
    elif scope(method).after_core:
        best = next((got for other in STARTS_AT.get(method, (RANK_R_DEFAULT,))
                     if (got := best_point(results, cell, other, steps)) is not None), None)
    else:
        best = None
    return k_of(METHODS[method][1]) if best is None else best[0]


def needed(results: dict, cell: str, method: str, steps: int) -> list[tuple[int, int]]:
    """The ``(k, seed)`` runs the protocol asks for next, given what is done."""
    seed0 = {k: v[0] for k, v in curve(results, cell, method, steps, (0,)).items()}
    k0 = start_k(results, cell, method, steps)
    if not seed0:
        return [(k0 - 1, 0), (k0, 0), (k0 + 1, 0)]
    best = min(seed0, key=lambda k: seed0[k] if math.isfinite(seed0[k]) else math.inf)
    todo = [(k, 0) for k in (best - 1, best + 1) if k not in seed0]
    if todo:  # the best is an edge: extend the bracket
        return todo
    # the mean over the seeds may move the best to an edge of what was run: bracket that one too
    centre = best_point(results, cell, method, steps)[0]  # (not None: seed 0's best is finite here)
    todo = [(k, 0) for k in (centre - 1, centre + 1) if k not in seed0]
    if todo:
        return todo
    seeds = [(k, s) for k in sorted({best - 1, best, best + 1, centre - 1, centre, centre + 1}) for s in SEEDS[1:]
             if key(cell, method, k, s, steps) not in results and math.isfinite(seed0[k])]
    if seeds or not windowed(method, cell, steps):
        return seeds
    # last, the lr window's edges (seed 0): outward while the outermost run is still within WINDOW of the best
    limit = seed0[best] * (1 + WINDOW)
    ks = sorted(seed0)
    return [(edge + step, 0) for edge, step in ((ks[0], -1), (ks[-1], 1))
            if math.isfinite(seed0[edge]) and seed0[edge] <= limit and abs(edge + step - best) <= WINDOW_REACH]


def best_point(results: dict, cell: str, method: str, steps: int) -> tuple[int, list[float]] | None:
    """The grid point with the lowest mean over its seeds, preferring points run with all seeds; None before a run
    ended below the base's loss (:func:`curve`)."""
    points = {k: v for k, v in curve(results, cell, method, steps).items() if math.isfinite(mean_or_inf(v))}
    full = {k: v for k, v in points.items() if len(v) == len(SEEDS)} or points
    if not full:
        return None
    k = min(full, key=lambda k: mean_or_inf(full[k]))
    return k, full[k]


def window_decades(results: dict, cell: str, method: str, steps: int) -> tuple[float, bool] | None:
    """The lr window in decades (bench/finetune_real.py's: the log-lr range around the best where the seed-0 loss,
    linear in log lr between grid points, stays within WINDOW of the best) and whether both its edges were crossed
    (False where it reaches the last lr run on a side: the grid not extended that far yet, or WINDOW_REACH reached);
    None with fewer than two points."""
    seed0 = sorted((k, v[0]) for k, v in curve(results, cell, method, steps, (0,), above_base_diverged=False).items())
    if len(seed0) < 2:
        return None
    points = [(lr_of(k), loss if math.isfinite(loss) else math.nan) for k, loss in seed0]
    _, lo, hi = window(points, WINDOW)
    open_ended = any(math.isclose(edge, points[i][0], rel_tol=1e-9) and math.isfinite(points[i][1])
                     for edge, i in ((lo, 0), (hi, -1)))
    return math.log10(hi / lo), not open_ended


def lr_window(results: dict, cell: str, method: str, steps: int) -> str:
    """:func:`window_decades` as the report prints it: ">=" before a window not crossed on a side, "-" for none."""
    got = window_decades(results, cell, method, steps)
    return "-" if got is None else f"{'' if got[1] else '>= '}{got[0]:.2f}"


def runs_at(results: dict, cell: str, method: str, k: int, steps: int) -> list[dict]:
    """The finished runs of ``method`` at grid point ``k``, one per seed run."""
    return [results[key(cell, method, k, s, steps)] for s in SEEDS if key(cell, method, k, s, steps) in results]


def report(results: dict, cells: list[str], methods: list[str], steps: int) -> str:
    rows = []
    for cell in cells:
        for method in methods:
            got = best_point(results, cell, method, steps)
            if got is None:
                tried = sorted(curve(results, cell, method, steps))
                if tried:  # every run so far ended above the base's loss
                    rows.append([cell, method, f"diverged at every lr run ({lr_of(tried[0]):g}-{lr_of(tried[-1]):g})",
                                 0, "-", "-", "-", "-", "-", "-"])
                continue
            k, losses = got
            runs = runs_at(results, cell, method, k, steps)
            quiet = quiet_seconds(results, cell, method, steps)
            seconds = statistics.mean(r["train_seconds"][str(steps)] for r in runs if "train_seconds" in r)
            sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
            tried = curve(results, cell, method, steps)
            interior = k - 1 in tried and k + 1 in tried
            rows.append([cell, method, f"{lr_of(k):g}" + ("" if interior else " (edge)"), len(losses),
                         f"{statistics.mean(losses):.4f} +- {sd:.4f}",
                         lr_window(results, cell, method, steps) if windowed(method, cell, steps) else "-",
                         f"{statistics.mean(r['stable_rank'] for r in runs if 'stable_rank' in r):.1f}",
                         f"{statistics.mean(r['update_norm'] for r in runs if 'update_norm' in r):.2f}",
                         "-" if quiet is None else f"{quiet:.0f}", f"{seconds:.0f}"])
    return markdown_table(["cell (domain:r)", "method", "best lr", "seeds", f"eval loss @{steps}",
                           "lr window, decades (2%, seed 0)", "stable rank of s B A (median layer)", "||s B A||_F (median layer)",
                           "train s (quiet, one thread)", "train s (as run, cores shared)"], rows)


def curves_table(results: dict, cells: list[str], methods: list[str], steps: int) -> str:
    """The horizon: each method's held-out loss at every evaluation of its runs at the best lr (mean over the seeds
    run), so a method that leads early and falls behind later shows where."""
    evals = list(range(EVAL_EVERY, steps + 1, EVAL_EVERY))
    rows = []
    for cell in cells:
        for method in methods:
            got = best_point(results, cell, method, steps) if runs_in(method, cell) else None
            if got is None:
                continue
            runs = runs_at(results, cell, method, got[0], steps)
            row = [statistics.mean(r.get("eval", {}).get(str(e), math.nan) for r in runs) for e in evals]
            rows.append([cell, method, f"{lr_of(got[0]):g}", len(runs), *(f"{v:.4f}" for v in row)])
    return markdown_table(["cell", "method", "best lr", "seeds", *(f"step {e}" for e in evals)], rows)


def frontier_points(results: dict, cell: str, method: str, steps: int) -> list[tuple[float, int, float, float]]:
    """``[(lr, seeds, training loss, held-out loss)]`` of every lr run, means over its seeds: the training loss is the
    mean of the last 10 batches' (``train_last10``), so a method's points trace how much held-out loss it buys per
    unit of training loss fitted; a run that ended above the base's loss (diverged) is left out."""
    start = results.get("_step0", {}).get(cell, math.inf)
    points = []
    for k in GRID:
        pairs = [(r["train_last10"], loss) for r in runs_at(results, cell, method, k, steps)
                 if (loss := final_loss(r, steps)) is not None and loss <= start and "train_last10" in r]
        if pairs:
            points.append((lr_of(k), len(pairs), statistics.mean(p[0] for p in pairs),
                           statistics.mean(p[1] for p in pairs)))
    return points


def frontier_table(results: dict, cell: str, methods: list[str], horizons: tuple[int, ...]) -> str:
    """Training against held-out loss at every lr run, per method and horizon (``frontier_points``): whether a method
    that ends lower held out fits the training split less (it stops earlier on one curve) or holds out better at
    the same training loss (its curve lies lower)."""
    rows = [[method, steps, f"{lr:.3g}", seeds, f"{train:.4f}", f"{held:.4f}", f"{held - train:.4f}"]
            for method in methods for steps in horizons
            for lr, seeds, train, held in frontier_points(results, cell, method, steps)]
    return markdown_table(["method", "steps", "lr", "seeds", "training loss (last 10 batches)", "held-out loss",
                           "held-out - training"], rows)


def save_frontier_figure(results: dict, cell: str, methods: list[str], horizons: tuple[int, ...], path: str) -> None:
    """One PNG: held-out against training loss at every lr run (``frontier_points``), a line per method and horizon
    (solid: the longest), each method's best lr ringed: a curve lower at the same training loss holds out better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    lows = []
    for i, method in enumerate(methods):
        colour = plt.get_cmap("tab10")(i)
        for steps in horizons:
            points = frontier_points(results, cell, method, steps)
            if not points:
                continue
            style = "-" if steps == max(horizons) else ":"
            ax.plot([p[2] for p in points], [p[3] for p in points], style, marker="o", ms=3, color=colour,
                    label=f"{method}, {steps} steps")
            best = min(points, key=lambda p: p[3])
            lows.append(best[3])
            ax.plot([best[2]], [best[3]], "o", ms=9, mfc="none", color=colour)
            if steps == max(horizons):  # the longest horizon's lr only: the shorter's bests crowd the same spot
                ax.annotate(f"{best[0]:.2g}", (best[2], best[3]), fontsize=6, xytext=(3, -9), textcoords="offset points")
    if lows:
        ax.set_ylim(min(lows) - 0.01, min(lows) + 0.08)
    ax.set_xlabel("training loss, last 10 batches (mean over the seeds run)")
    ax.set_ylabel("held-out loss at the end")
    ax.set_title(f"{cell}: each point one lr (ringed: each line's best; the longest horizon's lr written)\n"
                 "lower at the same training loss = holds out better", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


BASELINES = ("LoRA-AdamW", "LoRA+ (ratio 16)", "PoLAR")


def psi_family(method: str) -> bool:
    """A PSI-LoRA method (its LoRSum step, any settings; not the SVDLoRA oracles)."""
    args = METHODS[method][0]
    return args[args.index("--optim") + 1] in ("psilora", "scaled_psilora")


def settled(results: dict, cell: str, method: str, steps: int) -> bool:
    """Its best lr is interior and was run with every seed."""
    got = best_point(results, cell, method, steps)
    if got is None or len(got[1]) < len(SEEDS):
        return False
    points = curve(results, cell, method, steps)
    return got[0] - 1 in points and got[0] + 1 in points


def targets_table(results: dict, cells: list[str], methods: list[str], steps: int) -> str:
    """Issue 25's targets per cell, from the results: (1) the best PSI-family mean <= the best baseline's mean + its
    sd; (2) the best PSI-family mean below every baseline's by more than 2 sd (the larger of the two sds); (3) the
    default Scaled PSI-LoRA's lr window >= 1.5x LoRA-AdamW's. "provisional" while a method involved has fewer than 3
    seeds at an interior best (or, for 3, a window edge not crossed)."""
    rows = []
    for cell in cells:
        stats = {}
        for method in methods:
            got = best_point(results, cell, method, steps) if runs_in(method, cell) else None
            if got is not None and all(math.isfinite(v) for v in got[1]):
                losses = got[1]
                stats[method] = (statistics.mean(losses), statistics.stdev(losses) if len(losses) > 1 else math.nan)
        baselines = [m for m in BASELINES if m in stats]
        family = [m for m in stats if psi_family(m)]
        if not baselines or not family:
            continue
        base = min(baselines, key=lambda m: stats[m][0])
        psi = min(family, key=lambda m: stats[m][0])
        final = all(settled(results, cell, m, steps) for m in [*BASELINES, *family] if runs_in(m, cell))
        mark = "" if final else " (provisional)"
        sds = [stats[m][1] for m in [*baselines, psi]]
        if any(math.isnan(sd) for sd in sds):  # one seed somewhere: no sd to compare with yet
            one_text = two_text = "pending (one seed)"
        else:
            margins = [(stats[b][0] - stats[psi][0]) / max(stats[b][1], stats[psi][1]) for b in baselines]
            one_text = ("met" if stats[psi][0] <= stats[base][0] + stats[base][1] else "not met") + mark
            two_text = f"{min(margins):+.1f} sd: " + ("met" if min(margins) > 2 else "not met") + mark
        windows = [window_decades(results, cell, m, steps) for m in (DEFAULT_PSI, BASELINE)] \
            if windowed(DEFAULT_PSI, cell, steps) else None
        if windows is None:
            three = "- (no lr windows in this cell)"  # (its 3-point brackets would read as equal windows)
        elif None in windows:
            three = "-"
        else:
            (w_psi, closed_psi), (w_adam, closed_adam) = windows
            three = (f"{w_psi:.2f} / {w_adam:.2f} = {w_psi / w_adam:.2f}x: {'met' if w_psi >= 1.5 * w_adam else 'not met'}"
                     + ("" if closed_psi and closed_adam else " (provisional)"))
        rows.append([cell, f"{base} {stats[base][0]:.4f} +- {stats[base][1]:.4f}",
                     f"{psi} {stats[psi][0]:.4f} +- {stats[psi][1]:.4f}",
                     one_text, two_text, three])
    return markdown_table(["cell", "best baseline", "best PSI-family", "1: PSI <= baseline + sd",
                           "2: PSI below every baseline by > 2 sd (smallest margin)",
                           "3: lr window, default Scaled / AdamW (>= 1.5x)"], rows)


def builtin_best_lr(method: str) -> float | None:
    """The method's best lr on the built-in base (bench/finetune_real.py, 100 steps: the registry's measured
    ``default_lr``), where the map's method is a registry method with its defaults; None otherwise."""
    from psilora_ds.optim.registry import METHODS as REGISTRY

    args = METHODS[method][0]
    if method == FULL or len(args) != 2 or args[0] != "--optim":
        return None
    entry = REGISTRY.get(args[1])
    return entry.default_lr if entry is not None and entry.lr_measured else None


def transfer_table(results: dict, cells: list[str], methods: list[str], steps: int) -> str:
    """Item 4, learning rates that transfer: each method's best lr on the built-in base (100 steps) and per cell (the
    mean over the seeds run), its ratio to LoRA-AdamW's best on the same base and cell, and how far it moves from the
    first cell (x: factor, a grid point is 2.15x)."""
    baseline = BASELINE
    cells = [c for c in cells if best_point(results, c, baseline, steps)]
    if not cells:
        return ""
    adam = {c: lr_of(best_point(results, c, baseline, steps)[0]) for c in cells}
    adam_builtin = builtin_best_lr(baseline)
    rows = []
    for method in methods:
        got = {c: best_point(results, c, method, steps) for c in cells if runs_in(method, c)}
        best = {c: lr_of(g[0]) for c, g in got.items() if g is not None}
        if not best:
            continue
        first = best.get(cells[0])
        builtin = builtin_best_lr(method)
        rows.append([method, "-" if builtin is None else f"{builtin:.3g} ({builtin / adam_builtin:.2g}x AdamW)"] + [
            "-" if c not in best else f"{best[c]:.3g} ({best[c] / adam[c]:.2g}x AdamW"
            + ("" if c == cells[0] or first is None else f"; {best[c] / first:.2g}x {cells[0]}") + ")"
            for c in cells])
    return markdown_table(["method", "best lr, built-in base (100 steps)", *[f"best lr, {c}" for c in cells]], rows)


def loss_axis(bests: dict[str, float]) -> tuple[float, float]:
    """The range of the methods' best means in a cell (``bests``: method -> mean) that the figure's loss axes show:
    every LoRA method's, and full fine-tuning's (the ceiling) only where it is within 0.15 of them (on a domain shift
    it is 0.4 below: drawn, it would squash the methods the figure compares; :func:`off_scale` writes it instead)."""
    lora = [v for m, v in bests.items() if m != FULL]
    if not lora:
        low = min(bests.values(), default=0.0)
        return low, low
    low = min(lora)
    if FULL in bests and low - bests[FULL] <= 0.15:
        low = bests[FULL]
    return low, max(lora)


def off_scale(top, bottom, best_points: dict[str, tuple[int, list[float]]], floor: float) -> None:
    """A note in both panels for a best (``best_points``: method -> :func:`best_point`) below the loss axis
    (:func:`loss_axis`)."""
    below = [(m, k, mean_or_inf(losses)) for m, (k, losses) in best_points.items() if mean_or_inf(losses) < floor]
    if below:
        text = "; ".join(f"{m}: {mean:.3f} at lr {lr_of(k):g}, below the axis" for m, k, mean in below)
        for ax in (top, bottom):
            ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=7, va="bottom")


def save_figure(results: dict, cells: list[str], methods: list[str], steps: int, path: str) -> None:
    """One PNG: per cell, the final eval loss against lr (mean over the seeds run, bars from min to max) above the
    held-out loss against training seconds at each method's best lr (mean over its seeds; time-to-quality, the step
    overhead included). A method keeps its colour in every panel (the attempts dashed); one legend below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in cells if any(best_point(results, c, m, steps) for m in methods)]
    core, attempts = [m for m in methods if m not in ATTEMPTS], [m for m in methods if m in ATTEMPTS]
    style = {**{m: dict(color=plt.get_cmap("tab10")(i % 10), linestyle="-") for i, m in enumerate(core)},
             **{m: dict(color=plt.get_cmap("Dark2")(i % 8), linestyle="--") for i, m in enumerate(attempts)}}
    handles: dict[str, Any] = {}
    fig, axes = plt.subplots(2, len(cells), figsize=(5.5 * len(cells), 9), squeeze=False)
    for col, cell in enumerate(cells):
        top, bottom = axes[0][col], axes[1][col]
        best_points = {m: got for m in methods if (got := best_point(results, cell, m, steps))}
        for method, got in best_points.items():
            points = curve(results, cell, method, steps)
            ks = sorted(k for k in points if all(math.isfinite(v) for v in points[k]))
            means = [statistics.mean(points[k]) for k in ks]
            low = [m - min(points[k]) for k, m in zip(ks, means)]
            high = [max(points[k]) - m for k, m in zip(ks, means)]
            line = top.errorbar([lr_of(k) for k in ks], means, yerr=[low, high], marker="o", ms=3, capsize=2,
                                **style[method])
            handles.setdefault(method, line[0])
            runs = runs_at(results, cell, method, got[0], steps)
            at = sorted(int(t) for t in runs[0]["eval"] if int(t) > 0)
            quiet = [quiet_seconds(results, cell, method, t) for t in at]
            if "_step_seconds" in results and None in quiet:
                continue  # its step time was not measured quietly: "as run" seconds would be on another scale
            seconds = quiet if None not in quiet else [statistics.mean(r["train_seconds"][str(t)] for r in runs)
                                                      for t in at]
            losses = [statistics.mean(r["eval"][str(t)] for r in runs) for t in at]
            bottom.plot(seconds, losses, marker="o", ms=3, **style[method])
        low, high = loss_axis({m: mean_or_inf(losses) for m, (_, losses) in best_points.items()})
        top.set_xscale("log")
        top.set_ylim(low - 0.03, high + max(0.15, (high - low) / 2))
        top.set_title(f"{cell}: eval loss after {steps} steps")
        top.set_xlabel("learning rate")
        bottom.set_xlabel("training s, quiet CPU, one thread (steps x s/step)"
                          if "_step_seconds" in results else "training seconds (2-core CPU, one thread per run)")
        bottom.set_title(f"{cell}: held-out loss against time, best lr")
        bottom.set_ylim(low - 0.05, high + 0.45)
        for ax in (top, bottom):
            ax.set_ylabel("held-out loss")
            ax.grid(alpha=0.3)
        off_scale(top, bottom, best_points, low - 0.03)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.018 * math.ceil(len(handles) / 4), 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_attempts_figure(results: dict, cell: str, steps: int, path: str) -> None:
    """One PNG for the cell where the attempts ran: every PSI-LoRA setting and oracle at its best lr (a point, mean over
    its seeds, bars from min to max), sorted, against the baselines' means (vertical lines, their seeds' spread
    shaded) and full fine-tuning's (a note where it is off the axis): how far each attempt moved, and what is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settled = {m: got for m in METHODS if m != FULL and runs_in(m, cell)
               and (got := best_point(results, cell, m, steps))}  # method: (best lr's k, its losses)
    ours = sorted((m for m in settled if m not in BASELINES), key=lambda m: statistics.mean(settled[m][1]),
                  reverse=True)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(ours) + 1.6))
    for y, method in enumerate(ours):
        k, losses = settled[method]
        mean = statistics.mean(losses)
        colour = "tab:gray" if "oracle" in method else "tab:red" if method == DEFAULT_PSI else \
            "tab:orange" if method in ATTEMPTS else "tab:blue"
        ax.errorbar([mean], [y], xerr=[[mean - min(losses)], [max(losses) - mean]], marker="o", ms=4, capsize=2,
                    color=colour)
        ax.text(mean, y + 0.22, f"{mean:.4f} ({len(losses)} seed{'s' if len(losses) > 1 else ''}, lr "
                f"{lr_of(k):.2g})", fontsize=6, ha="center")
    for i, method in enumerate(b for b in BASELINES if b in settled):
        _, losses = settled[method]
        mean = statistics.mean(losses)
        colour = plt.get_cmap("Dark2")(i)
        ax.axvline(mean, color=colour, lw=1, label=f"{method} {mean:.4f}")
        if len(losses) > 1:
            sd = statistics.stdev(losses)
            ax.axvspan(mean - sd, mean + sd, color=colour, alpha=0.12)
    ax.set_yticks(range(len(ours)), ours, fontsize=7)
    ax.set_xlabel(f"held-out loss after {steps} steps at the best lr (lower is better)")
    ax.set_title(f"{cell}: every PSI-LoRA setting tried (red: the default; orange: the attempts; grey: oracles)",
                 fontsize=8)
    if full := best_point(results, cell, FULL, steps):
        ax.text(0.99, 0.01, f"full fine-tuning: {statistics.mean(full[1]):.4f} (off the axis)",
                transform=ax.transAxes, fontsize=6, ha="right", va="bottom")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", title="baselines (mean; shaded: +- sd)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cells", nargs="+", default=None,
                        help="default: every cell (at --steps 300), the horizon check's cell (other --steps)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: every method (at --steps 300), the horizon check's methods (other --steps)")
    parser.add_argument("--report", action="store_true", help="print the table of what is done and stop")
    parser.add_argument("--max_rounds", type=int, default=100, help="at most this many batches of runs per cell and method")
    parser.add_argument("--step_times", action="store_true",
                        help="only measure each method's seconds per step, one run at a time (on a quiet machine: "
                             "nothing else running); the report and figure then put time-to-quality on that scale")
    parser.add_argument("--step_time_rounds", type=int, default=1,
                        help="with --step_times: keep each method's fastest of this many rounds (one probe of every "
                             "method per round, about a minute each)")
    parser.add_argument("--write", default=None, help="write the table into this markdown file's section")
    parser.add_argument("--png", default=None, help="write the figure (loss vs lr; loss vs time) to this file")
    parser.add_argument("--frontier_png", default=None,
                        help="with --steps other than 300: write the figure of held-out against training loss at "
                             "every lr run, this horizon's and 300 steps', to this file")
    parser.add_argument("--attempts_png", default=None,
                        help="write the attempts' figure (every PSI setting tried on gnu-manuals r 16 against the "
                             "baselines) to this file")
    args = parser.parse_args()
    horizon = args.steps != STEPS  # the horizon check: its cell and methods unless named
    if args.frontier_png and not horizon:
        parser.error(f"--frontier_png compares a horizon with {STEPS} steps: give --steps too (e.g. --steps 600)")
    args.cells = args.cells or ([LONG_CELL] if horizon else list(ALL_CELLS))
    args.methods = args.methods or list(LONG_METHODS if horizon else METHODS)
    results = load_json(RESULTS)
    if not args.report:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the base's progress
        base, made = BASE_DIR, base_record()
        record = results.setdefault("_base", {k: made[k] for k in ("config", "parameters", "eval_loss_python_source",
                                                                  "eval_loss_python_reference")})
        if abs(record["eval_loss_python_source"] - made["eval_loss_python_source"]) > 1e-3:
            raise SystemExit(f"error: the base in {base} is not the one the results were measured on "
                             f"({made['eval_loss_python_source']:.4f} vs {record['eval_loss_python_source']:.4f})")
        save_results(results)
        if args.step_times:
            measure_step_times(results, args.cells, args.methods, base, args.step_time_rounds)
        if not args.step_times:
            run_map(results, args.cells, args.methods, args.steps, base, args.workers, args.max_rounds)
    table = report(results, args.cells, args.methods, args.steps)
    transfer = transfer_table(results, args.cells, args.methods, args.steps)
    targets = targets_table(results, args.cells, args.methods, args.steps)
    curves = curves_table(results, args.cells, args.methods, args.steps)
    print("\n\n".join((table, curves, transfer, targets)))
    if args.png:
        save_figure(results, args.cells, args.methods, args.steps, args.png)
    if args.attempts_png:
        save_attempts_figure(results, ATTEMPTS_CELL, args.steps, args.attempts_png)
    horizons = (STEPS, args.steps)
    if args.frontier_png:  # a horizon was given (checked above)
        save_frontier_figure(results, LONG_CELL, args.methods, horizons, args.frontier_png)
    if args.write and horizon:
        write_section(args.write, f"Quality map: the horizon, {args.steps} steps (issue 25)",
                      f"python bench/quality_map.py --steps {args.steps}",
                      f"{HORIZON_NOTE}\n\n{table}\n\nThe issue's targets at this horizon (`targets_table`):\n\n{targets}"
                      f"\n\nHeld-out loss at every evaluation, each method at its best lr (mean over "
                      f"the seeds run).\n\n{curves}\n\nTraining against held-out loss at every lr run, at "
                      f"{STEPS} and {args.steps} steps (`frontier_table`; the training loss is the mean of the last 10 "
                      f"batches, which differ per seed: its sd over seeds is about 0.05 at a grid point, 0.03 for a "
                      f"3-seed mean, where the held-out loss's is about 0.002): a method lower at the same training loss holds out "
                      f"better, not only fits less.\n\n{frontier_table(results, LONG_CELL, args.methods, horizons)}"
                      + (f"\n\n![frontier]({os.path.basename(args.frontier_png)})" if args.frontier_png else ""))
    elif args.write:
        base = results.get("_base", {})
        runs = sum(not k.startswith("_") for k in results)
        body = (f"Base: {base.get('parameters', 0) / 1e6:.2f} M parameters ({BASE}), held-out loss "
                f"{base.get('eval_loss_python_source', float('nan')):.3f} on Python source. {runs} runs "
                f"so far; a best lr marked (edge) is not yet bracketed, seeds < 3 are not yet the protocol's mean.\n\n"
                + table
                + ("\n\nLearning rates (item 4): each method's best lr on the built-in base (bench/finetune_real.py, "
                   "1.1 M parameters, 100 steps) and per cell here, as a multiple of LoRA-AdamW's best on the same base "
                   "and cell, and of its own best in the first cell (one grid point is 2.15x; a best not yet "
                   "bracketed or with fewer than 3 seeds may still move).\n\n" + transfer if transfer else "")
                + "\n\nThe horizon: held-out loss at every evaluation, each method at its best lr (mean over the seeds "
                  "run).\n\n" + curves
                + ("\n\nThe issue's targets per cell, computed from the table (`targets_table`: the PSI family is every "
                   "PSI-LoRA setting, attempts included, not the oracles; baselines LoRA-AdamW, LoRA+, PoLAR).\n\n"
                   + targets if targets else "")
                + "\n\nSized for this 2-core machine: a run takes 110-300 s on a quiet machine (one thread) and about 300 s (median) "
                  "with 2 workers sharing the cores, so about 24 runs an hour; a cell and method took 12-15 runs in the "
                  "first cell (5-7 of seed 0 to bracket, 6 more seeds, 2-4 for the lr window's edges): 8 methods (full "
                  "fine-tuning at r 16 only) x 3 cells, the 8 attempts on gnu-manuals r 16 (about 11 each: no window; rank_multiplier 2, "
                  "the default since session 20, and metric_power 1 with it, the default since session 22, in every cell "
                  "with their windows; the default's cache-free iters 0 in the r 16 cells) "
                  "and the Adam-direction oracle (3 seeds at its best, every cell) are about 410 runs, some 17 hours of this machine; "
                  "the r 128 extension (5 methods, 3 seeds around each best, no lr windows) about 50 more, some 3 hours "
                  "(the base is committed; pretraining it took 45-150 "
                  "minutes). Eval loss every 50 steps on the fixed held-out split. lr window: the decades of lr around "
                  "the best within 2% of its loss (seed 0; '>=': an edge not yet crossed). train s: training seconds "
                  "to step 300 (step overhead included), 'quiet' from each method's seconds per step measured one run "
                  "at a time with nothing else running (`--step_times`; " + step_times_note(results) + "), 'as run' summed in the "
                  "map's own runs, "
                  "inflated where tests or benches shared the cores (sessions 13-14: 170-850 s); the full fine-tuning "
                  "row's stable rank is of its dense update (not bounded by r)."
                + (f"\n\n![quality map]({os.path.basename(args.png)})" if args.png else "")
                + (f"\n\nThe attempts (item 3) on {ATTEMPTS_CELL}, every PSI-LoRA setting at its best lr against the "
                   f"baselines:\n\n![attempts]({os.path.basename(args.attempts_png)})" if args.attempts_png else ""))
        write_section(args.write, "Quality map (issue 25)", "python bench/quality_map.py", body)


if __name__ == "__main__":
    main()
