"""The PoLAR optimizer (psilora_ds/optim/polar.py) against its dense float64 step (reference.polar_step_dense, with
P from autograd on the product B S A), its gradients against autograd's on A, S, B, and its factors near the
Stiefel manifold over 200 steps."""

import pytest
import torch
from torch.nn import functional as F

from psilora_ds import find_lora_layers
from psilora_ds.optim import PoLAR
from psilora_ds.reference import polar_step_dense

from .test_polar_adapter import polar_net

f64 = torch.float64
KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, lam=0.5, weight_decay=0.1)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=g, dtype=f64), torch.randint(0, 3, (16,), generator=g)


def dense_grads(model, x, y):
    """``P = dL / d(B S A)`` per layer by autograd, with each layer's product as a leaf."""
    layers = find_lora_layers(model, polar=True)
    products = [(layer.B @ layer.S @ layer.A).detach().requires_grad_(True) for layer in layers]
    net = model.base_model.model
    W = [layer.module.base_layer.weight + layer.scaling * M for layer, M in zip(layers, products)]
    h = torch.tanh(F.linear(x, W[0], net.fc1.base_layer.bias))
    h = torch.tanh(F.linear(h, W[1], net.fc2.base_layer.bias))
    loss = F.cross_entropy(net.head(h), y)
    return torch.autograd.grad(loss, products)


@pytest.mark.parametrize("reuse", [True, False], ids=["autograd", "products"])
@pytest.mark.parametrize("cache_free", [True, False], ids=["cache-free", "rows"])
@pytest.mark.parametrize("core", ["full", "diag"])
def test_polar_steps_equal_the_dense_reference_and_its_gradients_autograd(core, cache_free, reuse):
    """Both ways of taking the products P A^T, B^T P: in the hooks (cache-free, the default: no rows kept) and from the
    cached rows; and autograd's A.grad, S.grad, B.grad taken for the Euclidean gradients they are (one process: the
    default after the first step's check), or the gradients computed from the products."""
    _, model = polar_net()
    opt = PoLAR(model, KW["lr"], betas=KW["betas"], polar_lam=KW["lam"], weight_decay=KW["weight_decay"],
                polar_core=core, other_lr=0.0, cache_max_bytes=None, cache_free=None if cache_free else False,
                reuse_autograd_grads=reuse)
    assert opt.cache_free == cache_free
    layers = opt.layers
    states = [{"step": 0, **{f"{k}_{n}": 0.0 for k in ("m", "v") for n in "ASB"}} for _ in layers]
    twin = [(layer.A.detach().clone(), layer.S.detach().clone(), layer.B.detach().clone()) for layer in layers]
    for step in range(4):
        x, y = batch(step)
        P = dense_grads(model, x, y)
        F.cross_entropy(model(x), y).backward()
        for layer, p in zip(layers, P):  # autograd's gradients are the method's Euclidean ones
            torch.testing.assert_close(layer.S.grad, layer.B.detach().T @ p @ layer.A.detach().T, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.B.grad, p @ (layer.S @ layer.A).detach().T, rtol=1e-10, atol=1e-12)
        opt.step()
        assert (opt.last_cache_bytes == 0) == cache_free
        opt.zero_grad()
        twin = [polar_step_dense(*t, p, st, **KW, core=core) for t, p, st in zip(twin, P, states)]
        for layer, (A, S, B) in zip(layers, twin):
            for got, want in ((layer.A, A), (layer.S, S), (layer.B, B)):
                torch.testing.assert_close(got.detach(), want, rtol=1e-7, atol=1e-9)  # (Adam divides by sqrt(v))
    assert all(float(layer.S.norm()) > 0 for layer in layers)
    # PoLAR's A.grad is S^T B^T P, its Euclidean gradient: taken from autograd after the first step's check
    assert opt.planner.autograd.state == ("on" if reuse else "off")
    if core == "diag":
        assert all(torch.count_nonzero(layer.S - torch.diag(layer.S.diagonal())) == 0 for layer in layers)


def test_directions_stay_near_the_manifold_over_200_steps():
    """Measured: ||A A^T - I||_F and ||B^T B - I||_F below 0.05 over 200 steps at lr 1e-2 (lam 1)."""
    _, model = polar_net()
    opt = PoLAR(model, 1e-2, polar_lam=1.0)
    worst = 0.0
    eye = torch.eye(3, dtype=f64)
    for step in range(200):
        x, y = batch(step % 10)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for layer in opt.layers:
            A, B = layer.A.detach(), layer.B.detach()
            worst = max(worst, float((A @ A.T - eye).norm()), float((B.T @ B - eye).norm()))
    assert worst < 0.05, worst
    assert opt.skipped_steps == 0


def test_cache_free_polar_equals_rows_under_accumulation_and_clipping():
    """3 micro-batches per step, clipping active, the norm from the same 32-probe sketch in both: the factors (A, S, B)
    from the hooks' products equal the cached rows' (2e-6, fp32), with no rows held, and a core changed behind the
    optimizer is an error, as for A and B."""
    from psilora_ds.products import StaleFactorsError

    from .distributed import regression_batches, rel_err
    from .models import polar_two_layer_net

    acc, clip = 3, 0.05
    results = {}
    for cache_free in (True, False):
        model = polar_two_layer_net()
        opt = PoLAR(model, 1e-2, polar_lam=0.5, weight_decay=0.1, max_grad_norm=clip, clip_norm_probes=32,
                    accumulation_steps=acc, cache_free=cache_free)
        held = []
        for i, (x, t) in enumerate(regression_batches(3, 4 * acc, 8)):
            F.mse_loss(model(x), t).div(acc).backward()
            if i % acc == acc - 1:
                opt.step()
                opt.zero_grad()
                held.append(opt.last_cache_bytes)
        assert opt.last_grad_norm > clip and (held == [0] * 4) == cache_free
        results[cache_free] = (model, opt, [(layer.A, layer.S, layer.B) for layer in opt.layers])
    (model, free, got), (_, rows, want) = results[True], results[False]
    assert free.last_grad_norm == pytest.approx(rows.last_grad_norm, rel=1e-6)
    # both took autograd's A.grad, S.grad, B.grad after the first step: the hooks then hold the clipping sketch only
    assert free.capture.autograd_reuse == "on" and rows.planner.autograd.state == "on"
    x, t = next(iter(regression_batches(5, 1, 8)))
    F.mse_loss(model(x), t).backward()
    sketch = sum(p.sketch.numel() * 4 for p in free.capture._batches.values())
    assert free.capture.nbytes == sketch > 0
    free.zero_grad()
    for a, b in zip(got, want):
        for f, g in zip(a, b):
            assert rel_err(f.detach(), g.detach()) <= 2e-6
    x, t = next(iter(regression_batches(4, 1, 8)))
    with torch.no_grad():
        free.layers[0].S.add_(0.1)  # e.g. an adapter loaded into the model
    F.mse_loss(model(x), t).backward()
    with pytest.raises(StaleFactorsError, match="refresh_factors"):
        free.step()


def test_the_recipe_trains_polar_and_a_resume_continues_identically(tmp_path):
    """``--optim polar``: the recipe builds PoLAR adapters; a run resumed from step 2 reaches the straight run's
    figures; ``adapter/`` is the plain LoRA fold (stock peft loads it) and ``adapter_polar/`` the directions and core
    (psilora_ds.polar_adapter.load_polar), the same model."""
    from .test_train_recipe import metrics, run

    common = ["--optim", "polar", "--tiny_hidden_size", "32", "--eval_every", "4", "--save_every", "2"]
    run([*common, "--max_steps", "4", "--output_dir", str(tmp_path / "straight")], tmp_path)
    run([*common, "--max_steps", "2", "--output_dir", str(tmp_path / "resumed")], tmp_path)
    run([*common, "--max_steps", "4", "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"],
        tmp_path)
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert straight[-1]["eval_loss"] == resumed[-1]["eval_loss"]
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from psilora_ds.polar_adapter import load_polar, polar_layers

    out = tmp_path / "straight"
    assert not any("lora_S" in k for k in load_file(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_S" in k for k in load_file(out / "adapter_polar" / "adapter_model.safetensors"))
    base_dir = next((tmp_path / "cache").glob("tiny-llama*"))  # the recipe's saved tiny base
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out / "adapter"))
    polar = load_polar(AutoModelForCausalLM.from_pretrained(base_dir), str(out / "adapter_polar"))
    assert polar_layers(polar) and not polar_layers(plain)
    ids = torch.arange(12).reshape(1, 12)
    torch.testing.assert_close(plain(input_ids=ids).logits, polar(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_the_recipe_trains_polar_on_a_4bit_base(tmp_path):
    """``--optim polar --load_in_4bit``: QLoRA with PoLAR's adapters (PolarLinear4bit); both adapter folders written."""
    pytest.importorskip("bitsandbytes")
    from .test_train_recipe import all_records, assert_outputs, run

    out = tmp_path / "qlora-polar"
    run(["--optim", "polar", "--load_in_4bit", "--bnb_4bit_compute_dtype", "float32", "--max_steps", "4",
         "--eval_every", "4", "--save_every", "0", "--output_dir", str(out), "--target_modules", "[q_proj, v_proj]"],
        tmp_path)
    assert_outputs(out)
    assert (out / "adapter_polar" / "adapter_model.safetensors").is_file()
    evals = [r["eval_loss"] for r in all_records(out) if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]  # step 0 (the base) and step 4


def test_the_trainer_integration_trains_polar_like_a_plain_loop(tmp_path):
    """``PSILoRATrainer(psilora=dict(optim="polar", ...))`` on a model with PoLAR adapters: the same factors as the
    loop written by hand (one process)."""
    from peft import get_peft_model

    from psilora_ds.hf import PSILoRATrainer
    from psilora_ds.polar_adapter import polar_config

    from . import hf_trainer_script as script
    from .models import tiny_llama

    def model():
        return get_peft_model(tiny_llama(seed=4), polar_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    settings = dict(lr=1e-2, polar_lam=0.5, betas=(0.9, 0.99))
    trained = model()
    trainer = PSILoRATrainer(model=trained, args=script.training_args(str(tmp_path), "none", learning_rate=1e-2),
                             train_dataset=script.SameRow(), psilora=dict(optim="polar", **settings))
    trainer.train()
    assert isinstance(trainer.psilora_optimizer, PoLAR) and trainer.psilora_optimizer.steps_taken == script.STEPS
    manual = model()
    opt = PoLAR(manual, max_grad_norm=100.0, **settings)
    batch = script.SameRow()[0]["input_ids"].repeat(2, 1)
    for _ in range(script.STEPS):
        for _ in range(2):
            (manual(input_ids=batch, labels=batch).loss / 2).backward()
        opt.step()
        opt.zero_grad()
    got = dict(trained.named_parameters())
    for name, p in manual.named_parameters():
        if p.requires_grad:
            err = float((got[name].detach() - p.detach()).norm() / p.detach().norm().clamp_min(1e-30))
            assert err <= 1e-5, (name, err)
    assert any("lora_S" in n for n, p in manual.named_parameters() if p.requires_grad)
