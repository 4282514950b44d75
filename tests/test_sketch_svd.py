"""The sketched spectral first step (ops/sketch_svd.py, METHOD.md section 5): the two-sided sketch against the dense
products, the fast path against the dense float64 reference, exactness when the gradient's rank is at most the
sketch's, and the error against the exact truncated SVD within the bound of Tropp et al. (2017)."""

import pytest
import torch

from psilora_ds import reference as ref
from psilora_ds.ops import factored_second_moments, svd_project, weighted_svd_project
from psilora_ds.ops.sketch_svd import (GradientSketch, range_corange_products, sketch_probes, sketch_widths,
                                       spectral_step_from_sketch, truncated_from_sketch)

f64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=f64)


def test_widths():
    assert sketch_widths(16, 4096, 11008) == (33, 67)
    assert sketch_widths(4, 16, 12) == (9, 16)  # capped by the layer: l <= m
    assert sketch_widths(8, 10, 6) == (6, 10)  # k = min(m, n): the whole range, exact


def test_range_corange_products_against_the_dense_gradient():
    g = torch.Generator().manual_seed(0)
    N, m, n, r = 50, 11, 9, 2
    Z, X = randn(N, m, g=g), randn(N, n, g=g)
    omega, psi = sketch_probes(m, n, r, 5, dtype=f64, device=torch.device("cpu"))
    Y, W = range_corange_products(Z, X, omega, psi)
    P = Z.T @ X
    assert rel(Y, P @ omega) < 1e-13 and rel(W, psi @ P) < 1e-13
    assert omega.shape == (n, 5) and psi.shape == (11, m)


@pytest.mark.parametrize("metric", [False, True])
@pytest.mark.parametrize("start", ["zero", "nonzero"])
def test_the_fast_path_is_the_dense_reference(metric, start):
    """``c0 B A + D_out^-1 (P + c M_B M_A) D_in^-1`` with P of full rank (the sketch is not exact): the thin-matrix
    reconstruction equals the dense float64 one built from the same probes (1e-10)."""
    g = torch.Generator().manual_seed(1)
    N, m, n, r, r_m = 40, 24, 18, 3, 3
    Z, X = randn(N, m, g=g), randn(N, n, g=g)
    A = randn(r, n, g=g)
    B = randn(m, r, g=g) if start == "nonzero" else torch.zeros(m, r, dtype=f64)
    M_A, M_B = randn(r_m, n, g=g), randn(m, r_m, g=g)
    d_out = randn(m, g=g).abs() + 0.1 if metric else None
    d_in = randn(n, g=g).abs() + 0.1 if metric else None
    c_p, c_m = -0.3, -0.2
    omega, psi = sketch_probes(m, n, r, 9, dtype=f64, device=torch.device("cpu"))
    Y, W = range_corange_products(Z, X, omega, psi)
    sketch = GradientSketch(Y, W, omega, psi).scaled(c_p)
    A_new, B_new = spectral_step_from_sketch(A, B, sketch, terms=[(c_m, M_B, M_A)], d_out=d_out, d_in=d_in)
    inner = c_p * Z.T @ X + c_m * M_B @ M_A
    T = B @ A + (inner if not metric else inner / d_out[:, None] / d_in[None, :])
    A_ref, B_ref = ref.sketched_spectral_step_dense(T, r, omega, psi, d_out, d_in)
    assert rel(B_new @ A_new, B_ref @ A_ref) < 1e-10
    torch.testing.assert_close(A_new @ A_new.T, B_new.T @ B_new)  # balanced, like the rows path's first step
    # and it is not the exact truncated SVD (so the two tests below test something)
    exact = svd_project(T, r) if not metric else weighted_svd_project(T, r, d_out, d_in)
    assert rel(B_new @ A_new, exact[1] @ exact[0]) > 1e-3


@pytest.mark.parametrize("metric", [False, True])
def test_exact_when_the_gradient_rank_is_at_most_k(metric):
    """``rank(P) <= k``: ``Y`` spans the range of ``S``, and the reconstruction is the exact truncated SVD."""
    g = torch.Generator().manual_seed(2)
    N, m, n, r = 6, 30, 20, 4  # rank(P) = 6 <= k = 9
    Z, X = randn(N, m, g=g), randn(N, n, g=g)
    d_out = randn(m, g=g).abs() + 0.1 if metric else None
    d_in = randn(n, g=g).abs() + 0.1 if metric else None
    omega, psi = sketch_probes(m, n, r, 3, dtype=f64, device=torch.device("cpu"))
    sketch = GradientSketch(*range_corange_products(Z, X, omega, psi), omega, psi)
    A, B = spectral_step_from_sketch(torch.zeros(r, n, dtype=f64), torch.zeros(m, r, dtype=f64), sketch,
                                     d_out=d_out, d_in=d_in)
    P = Z.T @ X
    exact = svd_project(P, r) if not metric else weighted_svd_project(P / d_out[:, None] / d_in[None, :], r,
                                                                      d_out, d_in)
    assert rel(B @ A, exact[1] @ exact[0]) < 1e-10


@pytest.mark.parametrize("decay", [0.5, 1.0, 2.0])
def test_error_within_the_sketch_bound(decay):
    """Tropp et al. 2017 (Theorems 4.3, 5.1, rho = r; k = 2r + 1, l = 2k + 1): ``E ||S - [[S^]]_r||_F <= 5
    tau_{r+1}(S)``, ``tau_{r+1}`` the exact truncated SVD's error. Mean over 40 draws of the probes, spectra
    ``s_j = j^-decay`` (0.5: flat, the hard case); measured 1.3-1.5 tau here."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 60, 40, 4
    U, _ = torch.linalg.qr(randn(m, n, g=g))
    V, _ = torch.linalg.qr(randn(n, n, g=g))
    s = torch.arange(1, n + 1, dtype=f64) ** -decay
    S = (U * s) @ V.T
    tau = float(s[r:].norm())
    errors = []
    for seed in range(40):
        omega, psi = sketch_probes(m, n, r, 100 + seed, dtype=f64, device=torch.device("cpu"))
        A, B = truncated_from_sketch(S @ omega, psi @ S, psi, r)
        errors.append(float((S - B @ A).norm()))
    mean = sum(errors) / len(errors)
    assert tau <= min(errors) and mean <= 5 * tau
    assert mean <= 2 * tau  # what this implementation reaches (well inside the theorem's bound)


def test_adafactor_statistics_are_unbiased_with_the_stated_spread():
    """``factored_second_moments``: each row (column) sum of ``G**2`` estimated as ``chi^2_k / k`` times itself: the
    mean over 400 draws within 4 standard errors of the exact sums, the spread ``sqrt(2 / k)`` within 15%."""
    g = torch.Generator().manual_seed(4)
    m, n, r, s = 14, 10, 2, 2.0
    P = randn(m, n, g=g)
    G = P / s
    exact_in, exact_out = (G**2).sum(0), (G**2).sum(1)
    draws_in, draws_out = [], []
    for seed in range(400):
        omega, psi = sketch_probes(m, n, r, 1000 + seed, dtype=f64, device=torch.device("cpu"))
        c, rr = factored_second_moments(P @ omega, psi @ P, s)
        draws_in.append(c / exact_in)
        draws_out.append(rr / exact_out)
    k, l = sketch_widths(r, m, n)
    for draws, width in ((torch.stack(draws_in), l), (torch.stack(draws_out), k)):
        sd = (2 / width) ** 0.5
        assert float((draws.mean(0) - 1).abs().max()) < 4 * sd / 400**0.5
        assert float((draws.std(0).mean() / sd - 1)) ** 2 < 0.15**2
