"""The paper's linear synthetic task: identity inputs, a random 600 x 200 target, rank-8 LoRA from
peft's initialization, summed MSE, full batch, 100 steps. The reducible loss left,
(f - f_opt) / (f_0 - f_opt) with f_opt from the SVD of the target, must shrink as LoRSum's
inner iterations grow, toward the SVDLoRA oracle's."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from psilora_ds import PSILoRA, SVDLoRA

STEPS, RANK, LR = 100, 8, 0.1


def linear_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    W_target = torch.randn(600, 200, generator=g)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(200, 600, bias=False))
    nn.init.zeros_(base[0].weight)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]))
    X = torch.eye(200)
    S = torch.linalg.svdvals(W_target)  # independent optimum: Eckart-Young
    return model, X, X @ W_target.T, float(S[RANK:].square().sum())


def reducible_left(make_optimizer):
    model, X, Y, f_opt = linear_task()
    opt = make_optimizer(model)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y, reduction="sum")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(F.mse_loss(model(X), Y, reduction="sum"))
    assert all(map(torch.isfinite, map(torch.tensor, losses + [final])))
    assert final < losses[0]
    return (final - f_opt) / (losses[0] - f_opt)


METHODS = {
    "SVDLoRA": lambda m: SVDLoRA(m, LR),
    "PSI-LoRA iters=0": lambda m: PSILoRA(m, LR, iters=0),
    "PSI-LoRA iters=1": lambda m: PSILoRA(m, LR, iters=1),
    "PSI-LoRA iters=2": lambda m: PSILoRA(m, LR, iters=2),
    "PSI-LoRA iters=8": lambda m: PSILoRA(m, LR, iters=8),
    "LoRA+AdamW lr=1e-2": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2),
}


@pytest.fixture(scope="module")
def figures():
    out = {name: reducible_left(make) for name, make in METHODS.items()}
    print("\nlinear task, fraction of reducible loss left after 100 steps (lr=0.1 unless stated):")
    for name, v in out.items():
        print(f"  {name:22s} {v:.4g}")
    return out


def test_every_method_falls_and_stays_finite(figures):
    assert all(0.0 <= v < 1.0 for v in figures.values()), figures


def test_more_inner_iterations_approach_the_svd_oracle(figures):
    chain = [figures[f"PSI-LoRA iters={k}"] for k in (0, 1, 2, 8)]
    assert all(later < earlier for earlier, later in zip(chain, chain[1:])), chain
    assert figures["PSI-LoRA iters=8"] < 0.6 * figures["PSI-LoRA iters=1"]
    assert figures["SVDLoRA"] < figures["PSI-LoRA iters=8"]
    assert figures["SVDLoRA"] < 1e-4
