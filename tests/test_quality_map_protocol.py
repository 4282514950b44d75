"""The quality map's lr-search protocol (bench/quality_map.py, issue 25) on made-up results: bracket with seed 0 until
the best is interior, seeds 1-2 around the best, then (core methods) the lr window's edges; the window it reports."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.quality_map as qm  # noqa: E402

CELL, METHOD, ATTEMPT, STEPS = "python-reference:16", "LoRA-AdamW", "Scaled prox 1e-3", 300


def with_runs(losses: dict[tuple[int, int], float], method: str = METHOD, cell: str = CELL) -> dict:
    """Results holding a run per ``(k, seed) -> final loss``."""
    return {qm.key(cell, method, k, s, STEPS): {"eval": {str(STEPS): loss}} for (k, s), loss in losses.items()}


def test_brackets_then_seeds_then_the_window_edges():
    k0 = qm.k_of(qm.METHODS[METHOD][1])
    assert qm.needed({}, CELL, METHOD, STEPS) == [(k0 - 1, 0), (k0, 0), (k0 + 1, 0)]
    # best at the low edge: extend downward
    runs = {(k0 - 1, 0): 3.70, (k0, 0): 3.72, (k0 + 1, 0): 3.80}
    assert qm.needed(with_runs(runs), CELL, METHOD, STEPS) == [(k0 - 2, 0)]
    runs[(k0 - 2, 0)] = 3.71  # interior now: seeds 1 and 2 at the best and its neighbours
    best = k0 - 1
    assert sorted(qm.needed(with_runs(runs), CELL, METHOD, STEPS)) == sorted(
        (k, s) for k in (best - 1, best, best + 1) for s in (1, 2))
    for k in (best - 1, best, best + 1):
        for s in (1, 2):
            runs[(k, s)] = runs[(k, 0)]
    # seeds done: the window's edges, outward while the outermost loss is within 2% of the best (above: 3.80 is
    # already past 3.774)
    assert qm.needed(with_runs(runs), CELL, METHOD, STEPS) == [(k0 - 3, 0)]
    runs[(k0 - 3, 0)] = 3.76  # still within: one further
    assert qm.needed(with_runs(runs), CELL, METHOD, STEPS) == [(k0 - 4, 0)]
    runs[(k0 - 4, 0)] = math.nan  # diverged: crossed
    assert qm.needed(with_runs(runs), CELL, METHOD, STEPS) == []
    # never further than WINDOW_REACH points from the best
    flat = {(k, s): 3.70 for k in range(best - qm.WINDOW_REACH, best + 2) for s in (0, 1, 2)}
    flat[(best + 1, 0)] = flat[(best + 1, 1)] = flat[(best + 1, 2)] = 3.90
    flat[(best, 0)] = 3.69
    assert qm.needed(with_runs(flat), CELL, METHOD, STEPS) == []


def test_attempts_stop_after_their_seeds():
    runs = {(k, s): 3.7 + 0.01 * abs(k + 2) for k in (-3, -2, -1) for s in (0, 1, 2)}
    assert qm.needed(with_runs(runs, ATTEMPT), CELL, ATTEMPT, STEPS) == []


def test_the_window_crosses_or_says_it_is_open():
    runs = {(-3, 0): 3.80, (-2, 0): 3.70, (-1, 0): 3.72, (0, 0): 3.90}
    # limit 3.774: crossed between k -3 and -2 and between -1 and 0, linearly in log10 lr
    got = float(qm.lr_window(with_runs(runs), CELL, METHOD, STEPS))
    lo = -2 / 3 - (3.774 - 3.70) / (3.80 - 3.70) / 3
    hi = -1 / 3 + (3.774 - 3.72) / (3.90 - 3.72) / 3
    assert got == pytest.approx(hi - lo, abs=0.01)
    open_low = {(-2, 0): 3.70, (-1, 0): 3.72, (0, 0): 3.90}
    assert qm.lr_window(with_runs(open_low), CELL, METHOD, STEPS).startswith(">= ")
    assert qm.lr_window(with_runs({(-2, 0): 3.7}), CELL, METHOD, STEPS) == "-"


def test_the_diagnostic_runs_in_every_cell_and_stops_after_its_seeds():
    oracle = qm.ADAM_ORACLE
    assert all(qm.runs_in(oracle, cell) for cell in qm.CELLS)
    assert not qm.runs_in(ATTEMPT, "python-reference:16")  # the attempts: gnu-manuals only
    # the default and the former default run in every cell (the rank-r one, which the attempts vary, in the issue's)
    assert all(qm.runs_in(m, c) for c in qm.ALL_CELLS for m in (qm.DEFAULT_PSI, qm.FORMER_DEFAULT))
    assert all(qm.runs_in(qm.RANK_R_DEFAULT, c) for c in qm.CELLS) and not qm.runs_in(qm.RANK_R_DEFAULT, qm.EXTENSION)
    runs = {(k, s): 3.7 + 0.01 * abs(k + 9) for k in (-10, -9, -8) for s in (0, 1, 2)}
    assert qm.needed(with_runs(runs, oracle), CELL, oracle, STEPS) == []  # no lr-window edges


def test_the_transfer_table_gives_ratios_to_adamw_in_the_same_cell():
    runs = with_runs({(k, s): 3.7 + 0.01 * abs(k + 8) for k in (-9, -8, -7) for s in (0, 1, 2)})
    runs.update(with_runs({(k, s): 3.7 + 0.01 * abs(k + 5) for k in (-6, -5, -4) for s in (0, 1, 2)},
                          "Scaled PSI-LoRA (defaults)"))
    table = qm.transfer_table(runs, [CELL], [METHOD, "Scaled PSI-LoRA (defaults)"], STEPS)
    # the built-in base's best (the registry's measured default lr) beside the cell's, each as a multiple of AdamW's
    assert "| LoRA-AdamW | 0.01 (1x AdamW) | 0.00215 (1x AdamW) |" in table
    assert "| Scaled PSI-LoRA (defaults) | 0.00316 (0.32x AdamW) | 0.0215 (10x AdamW) |" in table


def test_the_targets_are_computed_from_the_settled_results():
    adamw, loraplus, polar, scaled = "LoRA-AdamW", "LoRA+ (ratio 16)", "PoLAR", "Scaled PSI-LoRA (defaults)"

    def bowl(centre: int, bottom: float, seeds=(0, 1, 2), width=(-1, 0, 1)):
        # a bowl around `centre`, seeds 0.001 apart (sd 0.001)
        return {(centre + d, s): bottom + 0.02 * abs(d) + 0.001 * s for d in width for s in seeds}

    runs = {}
    for method, centre, bottom in ((adamw, -8, 3.700), (loraplus, -10, 3.705), (polar, -5, 3.710),
                                   (scaled, -5, 3.690)):
        runs.update(with_runs(bowl(centre, bottom), method))
    table = qm.targets_table(runs, [CELL], [adamw, loraplus, polar, scaled], STEPS)
    row = next(line for line in table.splitlines() if line.startswith(f"| {CELL}"))
    # PSI 3.691 against AdamW's 3.701 +- 0.001: below every baseline by 10 sd, all settled (interior, 3 seeds)
    assert "| met | +10.0 sd: met |" in row and "provisional" not in row.split("|")[4]
    # a PSI-family mean just above the best baseline's mean + its sd: target 1 not met, target 2 negative
    runs.update(with_runs(bowl(-5, 3.7025), scaled))
    row = next(line for line in qm.targets_table(runs, [CELL], [adamw, loraplus, polar, scaled], STEPS).splitlines()
               if line.startswith(f"| {CELL}"))
    assert "| not met | -2.5 sd: not met |" in row  # 3.7035 vs 3.7010, sd 0.001
    # one seed: no sd, nothing decided
    one_seed = with_runs(bowl(-8, 3.700, seeds=(0,)), adamw)
    one_seed.update(with_runs(bowl(-5, 3.690, seeds=(0,)), scaled))
    row = qm.targets_table(one_seed, [CELL], [adamw, scaled], STEPS).splitlines()[-1]
    assert row.count("pending (one seed)") == 2
    # the extension measures no lr windows: its brackets' three points are not windows to compare
    ext = {}
    for method, centre, bottom in ((adamw, -9, 3.700), (scaled, -11, 3.704)):
        ext.update(with_runs(bowl(centre, bottom), method, qm.EXTENSION))
    row = qm.targets_table(ext, [qm.EXTENSION], [adamw, scaled], STEPS).splitlines()[-1]
    assert row.endswith("| - (no lr windows in this cell) |") and "x: " not in row


def test_the_horizon_table_averages_each_evaluation_over_the_seeds_at_the_best_lr():
    runs = {}
    for k in (-9, -8, -7):
        for s in (0, 1):
            evals = {str(e): 4.0 - e / 1000 + 0.01 * abs(k + 8) + 0.002 * s for e in range(50, STEPS + 1, 50)}
            runs[qm.key(CELL, METHOD, k, s, STEPS)] = {"eval": evals}
    row = qm.curves_table(runs, [CELL], [METHOD], STEPS).splitlines()[-1]
    assert row == f"| {CELL} | {METHOD} | 0.002154 | 2 | 3.9510 | 3.9010 | 3.8510 | 3.8010 | 3.7510 | 3.7010 |"


def test_the_schedule_queues_each_idle_method_s_next_runs_core_before_attempts():
    other = "gnu-manuals:16"
    runs = with_runs({(k, s): 3.7 + 0.01 * abs(k + 8) for k in (-9, -8, -7) for s in (0, 1, 2)})  # AdamW: window next
    methods = [METHOD, "LoRA+ (ratio 16)", ATTEMPT]
    got = qm.schedule(runs, [CELL, other], methods, STEPS, busy=set())
    cells_methods = [(c, m) for c, m, _, _ in got]
    # every idle method's whole next batch (the protocol's own), the first cell first, the attempt (gnu-manuals only) last
    assert [(k, s) for c, m, k, s in got if (c, m) == (CELL, METHOD)] == qm.needed(runs, CELL, METHOD, STEPS)
    assert [(k, s) for c, m, k, s in got if (c, m) == (other, METHOD)] == qm.needed(runs, other, METHOD, STEPS)
    assert cells_methods.index((CELL, "LoRA+ (ratio 16)")) < cells_methods.index((other, METHOD))
    assert cells_methods[-1] == (other, ATTEMPT) and (CELL, ATTEMPT) not in cells_methods
    # a method with runs queued or running gets nothing more until they are in
    busy = qm.schedule(runs, [CELL, other], methods, STEPS, busy={(CELL, METHOD), (other, ATTEMPT)})
    assert all((c, m) not in {(CELL, METHOD), (other, ATTEMPT)} for c, m, _, _ in busy)


def test_a_bench_run_reports_a_refusal_but_a_bug_stops_the_bench(monkeypatch, tmp_path):
    """bench.common.recipe_run: a configuration the recipe refuses is a result ({"error": ...}, which the lr search
    reads as a failed lr); any other exception propagates (a library changed under the map's running workers once
    made every run end in a TypeError, recorded as failed runs)."""
    from bench.common import recipe_run
    from psilora_ds.recipe import runlog

    small = ["--model", "builtin:tiny-llama", "--tiny_hidden_size", "32", "--tiny_layers", "1", "--dataset",
             "builtin:generated", "--corpus_lines", "300", "--max_seq_len", "32", "--micro_batch_size", "2",
             "--eval_batches", "1", "--max_steps", "1", "--cache_dir", str(tmp_path)]
    refused = recipe_run([*small, "--lr", "-1"], scaling=2.0)
    assert set(refused) == {"error", "code"} and refused["error"].startswith("ConfigError"), refused

    def broken(self, exit_code):
        raise TypeError("a bug")

    monkeypatch.setattr(runlog.MetricsLog, "close", broken)
    with pytest.raises(TypeError, match="a bug"):
        recipe_run(small, scaling=2.0)


def test_a_bench_process_refuses_to_run_on_after_the_library_changed(monkeypatch):
    """Modules imported by a bench worker are those of its first run: a later run with changed sources would mix
    code versions in one results file, so recipe_run refuses; each result records its code version."""
    import bench.common as common

    assert len(common.code_version()) == 12 and common.code_version() == common.code_version()
    monkeypatch.setattr(common, "_first_code", "000000000000")
    with pytest.raises(RuntimeError, match="changed under this running bench"):
        common.recipe_run(["--max_steps", "1"], scaling=2.0)


def test_a_run_the_recipe_stopped_early_is_not_a_result():
    """A signal that reaches a bench worker (``pkill``) makes the recipe save and return 128 + N: its partial curve must
    not be recorded as a finished run (a missing final loss reads as divergence in the lr search)."""
    from types import SimpleNamespace

    from bench.common import finished_main

    finished_main(SimpleNamespace(main=lambda argv: 0), [])
    with pytest.raises(RuntimeError, match="exit code 143"):
        finished_main(SimpleNamespace(main=lambda argv: 143), [])


def test_an_attempt_starts_at_the_default_s_best_lr_in_its_cell():
    cell = "gnu-manuals:16"
    guess = qm.k_of(qm.METHODS[ATTEMPT][1])
    assert qm.needed({}, cell, ATTEMPT, STEPS) == [(guess - 1, 0), (guess, 0), (guess + 1, 0)]
    default = with_runs({(-3, 0): 3.9, (-2, 0): 3.8, (-1, 0): 3.85}, qm.RANK_R_DEFAULT, cell)
    assert qm.needed(default, cell, ATTEMPT, STEPS) == [(-3, 0), (-2, 0), (-1, 0)]
    # a core method keeps its own guess
    k0 = qm.k_of(qm.METHODS[METHOD][1])
    assert qm.needed(default, cell, METHOD, STEPS) == [(k0 - 1, 0), (k0, 0), (k0 + 1, 0)]


def test_the_combined_levers_start_at_metric_power_1_s_best_lr_else_at_the_default_s():
    cell, combined = "gnu-manuals:16", "Scaled metric_power 1 rank_multiplier 4"
    assert qm.scope(combined).cells == (cell, CELL) and qm.scope(combined).after_core
    runs = {**with_runs({(-3, 0): 3.9, (-2, 0): 3.8, (-1, 0): 3.85}, qm.RANK_R_DEFAULT, cell),
            **with_runs({(-4, 0): 3.8, (-3, 0): 3.7, (-2, 0): 9.9}, "Scaled metric_power 1", cell),
            **with_runs({(-12, 0): 3.8, (-11, 0): 3.7, (-10, 0): 3.9}, qm.DEFAULT_PSI, cell)}
    assert qm.needed(runs, cell, combined, STEPS) == [(-4, 0), (-3, 0), (-2, 0)]
    # the other attempts still start at the rank-r default's
    assert qm.needed(runs, cell, "Scaled prox 1e-3", STEPS) == [(-3, 0), (-2, 0), (-1, 0)]
    # where metric_power 1 alone never ran, at the default's best (its power, so its lr unit); none yet: the guess
    default = with_runs({(-12, 0): 3.8, (-11, 0): 3.7, (-10, 0): 3.9}, qm.DEFAULT_PSI, CELL)
    assert qm.needed(default, CELL, combined, STEPS) == [(-12, 0), (-11, 0), (-10, 0)]
    guess = qm.k_of(qm.METHODS[combined][1])
    assert qm.needed({}, CELL, combined, STEPS) == [(guess - 1, 0), (guess, 0), (guess + 1, 0)]


def test_a_step_time_round_times_the_baseline_first_and_last_and_replaces_the_stored_times_once(monkeypatch,
                                                                                                 tmp_path):
    probed: list[tuple[str, str]] = []

    def probe(task):
        rank, method, _ = task
        probed.append((rank, method))
        repeat = sum(p == (rank, method) for p in probed)
        return rank, method, (1.1 if repeat > 1 else 1.0) * (0.5 if method == qm.BASELINE else 0.7)

    monkeypatch.setattr(qm, "step_time_probe", probe)
    monkeypatch.setattr(qm, "RESULTS", str(tmp_path / "map.json"))
    results = {"_step_seconds": {"16": {"gone": 9.0}}}
    methods = ["PoLAR", qm.BASELINE, qm.DEFAULT_PSI]
    qm.measure_step_times(results, [CELL, "python-reference:64"], methods, "base")
    assert probed == [(r, m) for r in ("16", "64") for m in (qm.BASELINE, "PoLAR", qm.DEFAULT_PSI, qm.BASELINE)]
    assert results["_step_seconds"] == {r: {qm.BASELINE: 0.5, "PoLAR": 0.7, qm.DEFAULT_PSI: 0.7} for r in ("16", "64")}
    assert results["_step_seconds_round"]["baseline_again"] == {"16": 1.1, "64": 1.1}
    assert "1.100x" in qm.step_times_note(results) and results["_step_seconds_round"]["machine"] in \
        qm.step_times_note(results)
    # two rounds: each method's fastest, the baseline's drift furthest from 1
    probed.clear()
    qm.measure_step_times(results, [CELL], methods, "base", rounds=2)
    assert len(probed) == 8 and results["_step_seconds"]["16"] == {qm.BASELINE: 0.5, "PoLAR": 0.7, qm.DEFAULT_PSI: 0.7}
    assert results["_step_seconds_round"]["baseline_again"] == {"16": 1.1}  # round 1 drifted, round 2 did not
    assert "the fastest of 2 rounds" in qm.step_times_note(results)
    # a round that stops part-way leaves the stored times as they were
    def fails(task):
        raise KeyboardInterrupt
    monkeypatch.setattr(qm, "step_time_probe", fails)
    before = json.dumps(results, sort_keys=True)
    with pytest.raises(KeyboardInterrupt):
        qm.measure_step_times(results, [CELL], methods, "base")
    assert json.dumps(results, sort_keys=True) == before


def test_the_extension_cell_runs_last_with_five_methods_from_their_r64_best():
    assert [m for m in qm.METHODS if qm.runs_in(m, qm.EXTENSION)] == [
        "LoRA-AdamW", "LoRA+ (ratio 16)", "Scaled PSI-LoRA (defaults)", "Scaled metric_power 0.5 rank_multiplier 2",
        "PoLAR"]
    order = {cell: i for i, cell in enumerate(qm.ALL_CELLS)}
    tiers = sorted([(qm.EXTENSION, METHOD), ("gnu-manuals:16", ATTEMPT), ("gnu-manuals:16", METHOD),
                    (CELL, METHOD)], key=lambda t: qm.priority(t[0], t[1], order))
    assert tiers == [(CELL, METHOD), ("gnu-manuals:16", METHOD), ("gnu-manuals:16", ATTEMPT), (qm.EXTENSION, METHOD)]
    k0 = qm.k_of(qm.METHODS[METHOD][1])
    assert qm.needed({}, qm.EXTENSION, METHOD, STEPS) == [(k0 - 1, 0), (k0, 0), (k0 + 1, 0)]
    r64 = with_runs({(k, s): 3.6 + 0.01 * abs(k + 8) for k in (-9, -8, -7) for s in (0, 1, 2)}, METHOD,
                    "python-reference:64")
    assert qm.needed(r64, qm.EXTENSION, METHOD, STEPS) == [(-9, 0), (-8, 0), (-7, 0)]
    # the former default starts there at its own r 64 best too, not at the default's
    former = qm.FORMER_DEFAULT
    both = {**with_runs({(k, s): 3.6 + 0.01 * abs(k + 5) for k in (-6, -5, -4) for s in (0, 1, 2)}, former,
                        "python-reference:64"), **with_runs({(-8, 0): 3.6, (-9, 0): 3.7, (-7, 0): 3.7},
                                                            qm.DEFAULT_PSI, qm.EXTENSION)}
    assert qm.needed(both, qm.EXTENSION, former, STEPS) == [(-6, 0), (-5, 0), (-4, 0)]
    assert qm.priority(qm.EXTENSION, former, order)[0] == 2
    # 3 seeds around the best and no lr window there: an edge within 2% of the best asks for nothing more
    flat = {(k, s): 3.6 + 0.001 * abs(k + 8) for k in (-9, -8, -7) for s in (0, 1, 2)}
    assert qm.needed(with_runs(flat, METHOD, qm.EXTENSION), qm.EXTENSION, METHOD, STEPS) == []
    assert qm.needed(with_runs(flat, METHOD, CELL), CELL, METHOD, STEPS) == [(-10, 0), (-6, 0)]  # (an issue cell's)


def test_a_run_that_ends_above_the_base_s_loss_counts_as_diverged():
    # every seed-0 run ended worse than the base (finite, but diverged): extend towards smaller lr, run no seeds
    runs = with_runs({(-5, 0): 6.70, (-4, 0): 6.69, (-3, 0): 6.89, (-2, 0): 6.91})
    runs["_step0"] = {CELL: 5.0}
    assert qm.needed(runs, CELL, METHOD, STEPS) == [(-6, 0)]
    assert qm.curve(runs, CELL, METHOD, STEPS)[-4] == [math.inf]
    runs.update(with_runs({(-6, 0): 4.2}))
    assert qm.needed(runs, CELL, METHOD, STEPS) == [(-7, 0)]  # the best is the lowest edge: bracket it
    runs.update(with_runs({(-7, 0): 4.3}))
    assert qm.needed(runs, CELL, METHOD, STEPS) == [(-7, 1), (-7, 2), (-6, 1), (-6, 2)]  # no seeds at -5


def test_every_scaled_variation_names_its_momentum_rank_and_metric_power():
    # the default's runs follow the library's defaults; every other Scaled PSI-LoRA setting was run at a momentum
    # rank and metric power it names, so its runs stay reproducible when a default changes (it did twice:
    # rank_multiplier 1 -> 2, then the K-FAC metric's power 1/2 -> 1)
    for name, (args, _) in qm.METHODS.items():
        if args[:2] == ["--optim", "scaled_psilora"]:
            assert (args == qm.SCALED) == (name == qm.DEFAULT_PSI), name
            assert name == qm.DEFAULT_PSI or {"--rank_multiplier", "--metric_power"} <= set(args), name
    assert qm.METHODS[qm.FORMER_DEFAULT][0] == [*qm.SCALED, "--rank_multiplier", "2", "--metric_power", "0.5"]
    assert qm.METHODS[qm.RANK_R_DEFAULT][0] == [*qm.SCALED, "--rank_multiplier", "1", "--metric_power", "0.5"]
    # a renamed method's new name is in the map (its runs are found: the next test)
    assert set(qm.RENAMED_IN_SESSION_22.values()) <= set(qm.METHODS)


def test_every_committed_run_is_found_under_its_method_s_arguments():
    # a key is (cell, method, arguments, lr, seed, steps): arguments that differ from METHODS' (even in order) would
    # orphan the method's runs and make the map run them all again
    results = qm.load_json(qm.RESULTS)
    runs = [json.loads(k) for k in results if not k.startswith("_")]
    assert len(runs) > 400
    for cell, method, args, _, _, _ in runs:
        assert qm.METHODS[method][0] == args, (method, args)
        assert qm.runs_in(method, cell), (method, cell)


def test_the_attempts_figure_draws_every_psi_setting_of_the_committed_map(tmp_path, monkeypatch):
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *a, **k: drawn.append(a) or original(self, *a, **k))
    results = qm.load_json(qm.RESULTS)
    qm.save_attempts_figure(results, qm.ATTEMPTS_CELL, STEPS, str(tmp_path / "attempts.png"))
    assert (tmp_path / "attempts.png").stat().st_size > 10_000
    settled = [m for m in qm.METHODS if m not in (*qm.BASELINES, qm.FULL) and qm.runs_in(m, qm.ATTEMPTS_CELL)
               and qm.best_point(results, qm.ATTEMPTS_CELL, m, STEPS)]
    assert len(drawn) == len(settled) >= 10


def test_the_horizon_check_starts_at_the_300_step_best_and_runs_no_window():
    k0 = qm.k_of(qm.METHODS[METHOD][1])
    assert qm.needed({}, qm.LONG_CELL, METHOD, 600) == [(k0 - 1, 0), (k0, 0), (k0 + 1, 0)]
    at_300 = with_runs({(k, s): 3.6 + 0.01 * abs(k + 8) for k in (-9, -8, -7) for s in (0, 1, 2)}, METHOD,
                       qm.LONG_CELL)
    assert qm.needed(at_300, qm.LONG_CELL, METHOD, 600) == [(-9, 0), (-8, 0), (-7, 0)]
    long = {qm.key(qm.LONG_CELL, METHOD, k, s, 600): {"eval": {"600": 3.5 + 0.01 * abs(k + 8)}}
            for k in (-9, -8, -7) for s in (0, 1, 2)}
    assert qm.needed({**at_300, **long}, qm.LONG_CELL, METHOD, 600) == []  # seeds done; no lr window at 600 steps
    assert qm.windowed(METHOD, qm.LONG_CELL) and not qm.windowed(METHOD, qm.LONG_CELL, 600)


def test_saving_keeps_the_runs_another_map_process_wrote(tmp_path, monkeypatch):
    path = str(tmp_path / "map.json")
    monkeypatch.setattr(qm, "RESULTS", path)
    mine, theirs = {"a": {"eval": {"300": 3.6}}}, {"b": {"eval": {"600": 3.5}}}
    qm.save_results(theirs)
    qm.save_results(mine)  # began before "b" was written: it must not drop it
    with open(path) as f:
        assert json.load(f) == {"a": {"eval": {"300": 3.6}}, "b": {"eval": {"600": 3.5}}}
    assert "b" in mine  # and the process now knows of it
    # a step-time round's times win over a map process's stale copy; step-0 losses of both processes' cells stay
    fresh = {"_step_seconds": {"16": {METHOD: 0.5}}, "_step0": {CELL: 4.0}}
    stale = {"_step_seconds": {"16": {METHOD: 9.0}}, "_step0": {"gnu-manuals:16": 4.2}}
    qm.save_results(fresh, own=("_step_seconds",))
    qm.save_results(stale)
    with open(path) as f:
        saved = json.load(f)
    assert saved["_step_seconds"] == {"16": {METHOD: 0.5}}
    assert saved["_step0"] == {CELL: 4.0, "gnu-manuals:16": 4.2}


def test_frontier_points_average_seeds_and_leave_out_diverged_runs():
    def run(train: float, held: float) -> dict:
        return {"eval": {str(STEPS): held}, "train_last10": train}

    results = {"_step0": {CELL: 4.0},
               qm.key(CELL, METHOD, -3, 0, STEPS): run(3.0, 3.7), qm.key(CELL, METHOD, -3, 1, STEPS): run(3.2, 3.8),
               qm.key(CELL, METHOD, -2, 0, STEPS): run(2.5, 4.5),  # ended above the base's 4.0: diverged
               qm.key(CELL, METHOD, -1, 0, STEPS): {"eval": {}, "error": "ConfigError: diverged"},
               qm.key(CELL, METHOD, 0, 0, STEPS): run(2.9, 3.65)}
    got = qm.frontier_points(results, CELL, METHOD, STEPS)
    assert [(round(lr, 6), seeds) for lr, seeds, _, _ in got] == [(round(qm.lr_of(-3), 6), 2), (1.0, 1)]
    assert got[0][2:] == pytest.approx((3.1, 3.75)) and got[1][2:] == pytest.approx((2.9, 3.65))
    table = qm.frontier_table(results, CELL, [METHOD], (STEPS,))
    assert table.count(f"| {METHOD} | {STEPS} |") == 2
    assert "| 3.1000 | 3.7500 | 0.6500 |" in table and "| 2.9000 | 3.6500 | 0.7500 |" in table
