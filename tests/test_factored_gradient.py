"""The public factored-gradient API (psilora_ds.gradient.FactoredGradient) against the dense gradient formed by
autograd: P @ V, U^T @ P, ||P||_F^2 (exact and sketched), whatever holds the gradient (rows in several micro-batches,
a dense store, cache-free products), and its sum over ranks as rounds."""

import pytest
import torch

from psilora_ds import PSILoRA
from psilora_ds.gradient import FactoredGradient, LayerGradient, ProductGradient
from psilora_ds.ops.rounds import run_rounds

from .models import lora_two_layer_net
from .test_optimizers import DenseTwin, data, model_loss

f64 = torch.float64


def captured(cache_free: bool, fold: bool, micro_batches: int = 3):
    """A step's gradients as the optimizer plans them, and the dense ``P`` of each layer (autograd)."""
    model = lora_two_layer_net(head_trainable=False)
    opt = PSILoRA(model, 0.1, momentum=0.9, iters=0 if cache_free else 1, cache_free=cache_free, fold=fold,
                  cache_max_bytes=None if fold else "auto", max_grad_norm=1.0, clip_norm_probes=8)
    twin = DenseTwin(model)
    P = None
    for k in range(micro_batches):
        x, t = data(k)
        (model_loss(model, x, t) / micro_batches).backward()
        Pk, _, _, _ = twin.grads(x, t)
        P = [p / micro_batches for p in Pk] if P is None else [a + p / micro_batches for a, p in zip(P, Pk)]
    plan = opt.planner.plan(opt.other_groups(), None, opt.steps_taken, 8)
    return opt, plan.grads, P


@pytest.mark.parametrize("fold", [False, True])
def test_rows_gradient_products_and_norm_equal_the_dense_gradient(fold):
    opt, grads, P = captured(cache_free=False, fold=fold)
    g = torch.Generator().manual_seed(0)
    for idx, grad in grads.items():
        assert isinstance(grad, LayerGradient) and isinstance(grad, FactoredGradient)
        assert (grad.dense is not None) == fold
        m, n = P[idx].shape
        V, U = torch.randn(n, 5, generator=g, dtype=f64), torch.randn(m, 3, generator=g, dtype=f64)
        torch.testing.assert_close(run_rounds(grad.right_product(V), None), P[idx] @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(run_rounds(grad.left_product(U), None), U.T @ P[idx], rtol=1e-10, atol=1e-12)
        exact = float(P[idx].square().sum())
        assert float(run_rounds(grad.norm_sq(0, 0), None)) == pytest.approx(exact, rel=1e-10)
        sketches = [float(run_rounds(grad.norm_sq(64, seed), None)) for seed in range(200)]
        assert sum(sketches) / len(sketches) == pytest.approx(exact, rel=0.1)  # unbiased (sd <= sqrt(2/64)/sqrt(200))


def test_products_are_summed_over_ranks_in_one_round_each():
    """Two ranks holding the same rows: each product is one round, and the sum doubles it."""
    _, grads, P = captured(cache_free=False, fold=False)
    grad = grads[0]
    grad.reduce = lambda t: t.mul_(2)
    V = torch.ones(P[0].shape[1], 2, dtype=f64)
    program = grad.right_product(V)
    local = next(program)  # the one round: this rank's P_k V
    with pytest.raises(StopIteration) as done:
        program.send(local * 2)
    torch.testing.assert_close(done.value.value, 2 * P[0] @ V, rtol=1e-10, atol=1e-12)


def test_cache_free_gradient_knows_its_products_at_the_probe_factors_only():
    opt, grads, P = captured(cache_free=True, fold=False)
    for idx, grad in grads.items():
        assert isinstance(grad, ProductGradient) and isinstance(grad, FactoredGradient)
        layer = opt.layers[idx]
        A, B = layer.A.detach(), layer.B.detach()
        torch.testing.assert_close(run_rounds(grad.right_product(A.T), None), P[idx] @ A.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(run_rounds(grad.left_product(B), None), B.T @ P[idx], rtol=1e-10, atol=1e-12)
        _, right = opt.capture.probes.pair(idx)
        M_A = right[layer.rank:]  # the momentum's factors, the other probes
        torch.testing.assert_close(run_rounds(grad.right_product(M_A.T), None), P[idx] @ M_A.T, rtol=1e-10,
                                   atol=1e-12)
        with pytest.raises(ValueError, match="only at the factors its products were taken at"):
            run_rounds(grad.right_product(torch.ones_like(A.T)), None)
        with pytest.raises(ValueError, match="only at the factors"):
            run_rounds(grad.left_product(torch.ones_like(B)), None)
        # the hooks' sketch (8 probes): an estimate of the exact norm, within its bound of 4 sd
        est, exact = float(run_rounds(grad.norm_sq(0, 0), None)), float(P[idx].square().sum())
        assert abs(est - exact) <= 4 * (2 / 8) ** 0.5 * exact


def test_a_method_declares_its_factor_list_and_the_distributor_reads_and_writes_it_in_order():
    """Factors are a per-layer list (A, B by default; PoLAR's A, S, B): the distributor finds each layer's slice of the
    LoRA param group from the lists it is bound with, and a write must give the whole list."""
    from psilora_ds.distributed import Distributor
    from psilora_ds.lora_layers import find_lora_layers

    model = lora_two_layer_net()
    layers = find_lora_layers(model)
    cores = [torch.nn.Parameter(torch.eye(layer.rank, dtype=f64)) for layer in layers]
    lists = [(layer.A, core, layer.B) for layer, core in zip(layers, cores)]
    masters = [p for f in lists for p in f]
    d = Distributor()
    d.bind(layers, factors=lists)
    for layer, f in zip(layers, lists):
        assert all(a is b for a, b in zip(d.read_factors(layer, masters), f, strict=True))
        new = tuple(torch.full_like(p, float(i)) for i, p in enumerate(f))
        with torch.no_grad():
            d.write_factors(layer, masters, *new)
        assert all(torch.equal(p, n) for p, n in zip(f, new))
        assert d.factors_changed([layer], masters, [new]).tolist() == [0.0]
        assert d.factors_changed([layer], masters, [tuple(n + 1 for n in new)]).tolist() == [1.0]
        with pytest.raises(ValueError), torch.no_grad():
            d.write_factors(layer, masters, *new[:2])  # a partial list is an error, never a silent half-write
    with pytest.raises(RuntimeError, match="param group holds"):
        d.read_factors(layers[0], masters[:-1])
