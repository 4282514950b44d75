"""The paper's linear synthetic task: identity inputs, a random 600 x 200 target, rank-8 LoRA from
peft's initialization, summed MSE, full batch, 100 steps. The reducible loss left,
(f - f_opt) / (f_0 - f_opt) with f_opt from the SVD of the target, must shrink as LoRSum's
inner iterations grow, toward the SVDLoRA oracle's."""

import math

import pytest
import torch

from psilora_ds import PSILoRA, SVDLoRA
from psilora_ds.synthetic import linear_task, reducible_left, train_full_batch

STEPS, LR = 100, 0.1

METHODS = {
    "SVDLoRA": lambda m: SVDLoRA(m, LR),
    "PSI-LoRA iters=0": lambda m: PSILoRA(m, LR, iters=0),
    "PSI-LoRA iters=1": lambda m: PSILoRA(m, LR, iters=1),
    "PSI-LoRA iters=2": lambda m: PSILoRA(m, LR, iters=2),
    "PSI-LoRA iters=8": lambda m: PSILoRA(m, LR, iters=8),
    "LoRA+AdamW lr=1e-2": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2),
}


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, make in METHODS.items():
        task = linear_task(seed=0)
        # independent optimum: the tail of the target's spectrum, recomputed here from the data
        W_target = task.Y.T  # X = I
        assert task.f_opt == pytest.approx(float(torch.linalg.svdvals(W_target.double())[8:].square().sum()), rel=1e-5)
        losses = train_full_batch(task, make, STEPS)
        out[name] = (losses, reducible_left(task, losses))
    print("\nlinear task, fraction of reducible loss left after 100 steps (lr=0.1 unless stated):")
    for name, (_, v) in out.items():
        print(f"  {name:22s} {v:.4g}")
    return out


def test_every_method_falls_and_stays_finite(runs):
    for name, (losses, left) in runs.items():
        assert all(math.isfinite(v) for v in losses), name
        # (the SVD oracle reaches the optimum: its share left is 0 up to fp32 rounding, about -7e-7 on some CPUs)
        assert losses[-1] < losses[0] and -1e-5 <= left < 1.0, (name, left)


def test_more_inner_iterations_approach_the_svd_oracle(runs):
    chain = [runs[f"PSI-LoRA iters={k}"][1] for k in (0, 1, 2, 8)]
    assert all(later < earlier for earlier, later in zip(chain, chain[1:])), chain
    assert runs["PSI-LoRA iters=8"][1] < 0.6 * runs["PSI-LoRA iters=1"][1]
    assert runs["SVDLoRA"][1] < runs["PSI-LoRA iters=8"][1]
    assert runs["SVDLoRA"][1] < 1e-4
