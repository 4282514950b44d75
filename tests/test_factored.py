"""Gram-trick norms and metric statistics against dense computations."""

import pytest
import torch

from psilora_ds import reference as ref
from psilora_ds.ops import (damped_power, dense_gradient, frobenius_sq, gradient_gram_diagonals, kfac_diagonals,
                            kfac_sums, shampoo_diagonals, thin_product)

f64 = torch.float64


def factors(N, m, n, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, m, generator=g, dtype=dtype), torch.randn(N, n, generator=g, dtype=dtype)


# (N, m, n): the first two take the Gram route (N (m+n) <= m n), the last the dense route.
SHAPES = [(7, 50, 40), (45, 50, 40), (300, 20, 10)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [4, 1024])
def test_frobenius_norm_equals_dense(shape, chunk):
    Z, X = factors(*shape)
    P = Z.T @ X
    assert float(frobenius_sq(Z, X, chunk_rows=chunk)) == pytest.approx(float((P**2).sum()), rel=1e-12)


def test_frobenius_norm_low_precision_accumulates_in_float32():
    Z, X = factors(45, 50, 40, dtype=torch.bfloat16)
    P = Z.double().T @ X.double()
    assert float(frobenius_sq(Z, X, chunk_rows=8)) == pytest.approx(float((P**2).sum()), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_shampoo_diagonals_equal_dense(shape):
    Z, X = factors(*shape, seed=1)
    P = Z.T @ X
    d_in, d_out = gradient_gram_diagonals(Z, X, chunk_rows=16)
    torch.testing.assert_close(d_in, torch.diagonal(P.T @ P), rtol=1e-12, atol=0)
    torch.testing.assert_close(d_out, torch.diagonal(P @ P.T), rtol=1e-12, atol=0)
    e_in, e_out = ref.shampoo_diagonal_stats(P, 2.0)
    s_in, s_out = shampoo_diagonals(X, Z, 2.0)
    torch.testing.assert_close(s_in, e_in)
    torch.testing.assert_close(s_out, e_out)


def test_kfac_diagonals_equal_per_example_definition():
    """With a mean-reduced loss over N rows, per-example output gradients are N z / scaling."""
    Z, X = factors(33, 12, 9, seed=2)
    d_in, d_out = kfac_diagonals(*kfac_sums(X, Z), rows=33, scaling=0.5)
    N = 33
    per_example_g = N * Z / 0.5
    torch.testing.assert_close(d_in, (X**2).sum(0) / N)
    torch.testing.assert_close(d_out, (per_example_g**2).sum(0) / N)
    e_in, e_out = ref.kfac_diagonal_stats(X, Z, 0.5)
    torch.testing.assert_close(d_in, e_in)
    torch.testing.assert_close(d_out, e_out)


def test_kfac_rescaling_recovers_per_example_second_moment_of_a_mean_loss():
    """Independent check through autograd: for L = mean_i l_i(W x_i), the captured z_i are
    dl_i/dy_i / N; the metric must equal mean_i (dl_i/dy_i)^2."""
    torch.manual_seed(3)
    N, n, m = 16, 5, 4
    W = torch.randn(m, n, dtype=f64)
    x = torch.randn(N, n, dtype=f64)
    t = torch.randn(N, m, dtype=f64)
    y = (x @ W.T).requires_grad_(True)
    loss = ((y - t) ** 4).sum(1).mean()
    (z,) = torch.autograd.grad(loss, y)
    per_example = 4 * (y.detach() - t) ** 3
    _, d_out = kfac_diagonals(*kfac_sums(x, z), rows=N, scaling=1.0)
    torch.testing.assert_close(d_out, (per_example**2).mean(0))


def test_damped_power_closed_form():
    s = torch.tensor([0.0, 1.0, 4.0], dtype=f64)
    torch.testing.assert_close(damped_power(s, 1e-2, 0.5), torch.tensor([0.1, 1.01**0.5, 4.01**0.5], dtype=f64))
    torch.testing.assert_close(damped_power(s, 1.0, 0.0), torch.ones(3, dtype=f64))


def test_dense_gradient_chunks():
    Z, X = factors(50, 7, 6, seed=4)
    torch.testing.assert_close(dense_gradient(Z, X, chunk_rows=8), Z.T @ X)


@pytest.mark.parametrize("layout", ["rows transposed", "contiguous", "one row"])
def test_thin_product_equals_the_plain_product(layout):
    """``thin_product`` reorients ``Z^T Y`` for speed only: the value is the plain product's, in either layout."""
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(1 if layout == "one row" else 64, 40, generator=g, dtype=f64)
    F = Z.T if layout != "contiguous" else Z.T.contiguous()
    Y = torch.randn(Z.shape[0], 5, generator=g, dtype=f64)
    out = thin_product(F, Y)
    assert out.shape == (40, 5)
    torch.testing.assert_close(out, Z.T.contiguous() @ Y, rtol=1e-12, atol=1e-12)
    if layout == "rows transposed":  # the reoriented route: the transposed view of the wide product
        assert out.stride() == (1, 40)
