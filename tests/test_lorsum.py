"""LoRSum / F-LoRSum kernels against dense SVD, closed forms and the dense float64 reference."""

import pytest
import torch

from psilora_ds import reference as ref
from psilora_ds.ops import SPDSolve, lorsum, solve_spd_batch, solve_spd_left, svd_project, weighted_svd_project

f64 = torch.float64


def problem(m=60, n=40, r=5, N=30, seed=0, zero_B=False, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=dtype) / n**0.5
    B = torch.zeros(m, r, dtype=dtype) if zero_B else torch.randn(m, r, generator=g, dtype=dtype)
    Z = torch.randn(N, m, generator=g, dtype=dtype)
    X = torch.randn(N, n, generator=g, dtype=dtype)
    F2 = torch.randn(m, 2, generator=g, dtype=dtype)
    H2 = torch.randn(2, n, generator=g, dtype=dtype)
    return A, B, Z, X, F2, H2


def dense_target(A, B, terms, c0=1.0):
    return c0 * B @ A + sum(c * F @ H for c, F, H in terms)


def residual(T, A, B):
    return float(torch.linalg.norm(T - B @ A))


def svd_residual(T, r):
    S = torch.linalg.svdvals(T)
    return float(S[r:].square().sum().sqrt())


@pytest.mark.parametrize("zero_B", [False, True])
def test_many_iterations_reach_truncated_svd(zero_B):
    A, B, Z, X, F2, H2 = problem(zero_B=zero_B)
    terms = [(-0.3, Z.T, X), (0.5, F2, H2)]
    T = dense_target(A, B, terms, c0=0.7)
    A1, B1 = lorsum(A, B, terms, c0=0.7, lam=1e-10, iters=300)
    assert torch.isfinite(A1).all() and torch.isfinite(B1).all()
    assert residual(T, A1, B1) == pytest.approx(svd_residual(T, 5), rel=1e-8)
    As, Bs = svd_project(T, 5)
    torch.testing.assert_close(B1 @ A1, Bs @ As, rtol=0, atol=1e-6 * float(T.norm()))


def test_residual_approaches_svd_as_iterations_grow():
    A, B, Z, X, _, _ = problem(m=80, n=50, r=6, N=40, seed=1)
    terms = [(-0.2, Z.T, X)]
    T = dense_target(A, B, terms)
    opt = svd_residual(T, 6)
    excess = [residual(T, *lorsum(A, B, terms, lam=1e-9, iters=k)) - opt for k in (1, 2, 4, 8, 16)]
    assert all(e >= -1e-9 for e in excess)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(excess, excess[1:]))
    assert excess[-1] < 1e-3 * excess[0]


def test_jacobi_is_closed_form_preconditioned_lora():
    A, B, Z, X, _, _ = problem(seed=2)
    eta, lam = 0.05, 1e-3
    P = Z.T @ X
    A1, B1 = lorsum(A, B, [(-eta, Z.T, X)], lam=lam, iters=0)
    eye = torch.eye(5, dtype=f64)
    A_expected = A - eta * torch.linalg.solve(B.T @ B + lam * eye, B.T @ P)
    B_expected = B - eta * P @ A.T @ torch.linalg.inv(A @ A.T + lam * eye)
    torch.testing.assert_close(A1, A_expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B1, B_expected, rtol=1e-10, atol=1e-12)


def test_zero_B_first_iteration_projects_onto_row_space_of_A():
    A, B, Z, X, _, _ = problem(zero_B=True, seed=3)
    lam = 1e-9
    A1, B1 = lorsum(A, B, [(-0.1, Z.T, X)], lam=lam, iters=1)
    T = -0.1 * Z.T @ X
    torch.testing.assert_close(A1, A, rtol=0, atol=1e-14)
    eye = torch.eye(5, dtype=f64)
    torch.testing.assert_close(B1, T @ A.T @ torch.linalg.inv(A @ A.T + lam * eye), rtol=1e-9, atol=1e-12)


def test_f_lorsum_reaches_weighted_svd_optimum():
    A, B, Z, X, F2, H2 = problem(seed=4)
    g = torch.Generator().manual_seed(5)
    d_out = torch.rand(60, generator=g, dtype=f64) * 3 + 0.2
    d_in = torch.rand(40, generator=g, dtype=f64) * 3 + 0.2
    terms = [(-0.3, Z.T, X), (0.5, F2, H2)]
    # T~ = c0 BA + sum c D_out^-1 F H D_in^-1
    T_tilde = B @ A + sum(c * (F / d_out[:, None]) @ (H / d_in[None, :]) for c, F, H in terms)
    A1, B1 = lorsum(A, B, terms, lam=1e-10, iters=400, d_out=d_out, d_in=d_in)
    Aw, Bw = weighted_svd_project(T_tilde, 5, d_out, d_in)
    so, si = d_out.sqrt()[:, None], d_in.sqrt()[None, :]
    best = svd_residual(so * T_tilde * si, 5)
    got = float(torch.linalg.norm(so * (B1 @ A1 - T_tilde) * si))
    assert got == pytest.approx(best, rel=1e-8)
    torch.testing.assert_close(B1 @ A1, Bw @ Aw, rtol=0, atol=1e-6 * float(T_tilde.norm()))


@pytest.mark.parametrize("iters", [0, 1, 2, 3])
@pytest.mark.parametrize("metric", [False, True])
@pytest.mark.parametrize("zero_B", [False, True])
def test_matches_dense_reference(iters, metric, zero_B):
    A, B, Z, X, F2, H2 = problem(seed=6, zero_B=zero_B)
    terms = [(-0.3, Z.T, X), (0.5, F2, H2)]
    d_out = d_in = None
    T = B @ A + sum(c * F @ H for c, F, H in terms)
    if metric:
        g = torch.Generator().manual_seed(7)
        d_out = torch.rand(60, generator=g, dtype=f64) + 0.5
        d_in = torch.rand(40, generator=g, dtype=f64) + 0.5
        T = B @ A + sum(c * (F / d_out[:, None]) @ (H / d_in[None, :]) for c, F, H in terms)
    A1, B1 = lorsum(A, B, terms, lam=1e-2, iters=iters, d_out=d_out, d_in=d_in)
    A2, B2 = ref.lorsum_dense(A, B, T, lam=1e-2, iters=iters, d_out=d_out, d_in=d_in)
    torch.testing.assert_close(A1, A2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B1, B2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_compute_in_float32(dtype):
    A, B, Z, X, _, _ = problem(seed=8)
    A1, B1 = lorsum(A.to(dtype), B.to(dtype), [(-0.1, Z.T.to(dtype), X.to(dtype))], lam=1e-3, iters=2)
    assert A1.dtype == dtype and B1.dtype == dtype
    A2, B2 = lorsum(A.to(dtype).double(), B.to(dtype).double(),
                    [(-0.1, Z.T.to(dtype).double(), X.to(dtype).double())], lam=1e-3, iters=2)
    # only the output rounding to `dtype` separates the two
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(A1.double(), A2, rtol=tol, atol=tol)
    torch.testing.assert_close(B1.double(), B2, rtol=tol, atol=tol)


def test_solve_falls_back_when_cholesky_fails():
    G = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=f64)  # symmetric, indefinite
    R = torch.tensor([[1.0], [3.0]], dtype=f64)
    torch.testing.assert_close(G @ solve_spd_left(G, R), R)


def test_batched_solves_equal_each_system_solved_alone(monkeypatch):
    """Systems of two shapes, left and right, one of them indefinite (its Cholesky fails inside the batch):
    one factorization per shape, each answer equal to the dense solve (or to the least-squares fallback)."""
    g = torch.Generator().manual_seed(3)

    def spd(k):
        M = torch.randn(k, k, generator=g, dtype=f64)
        return M @ M.T + 0.1 * torch.eye(k, dtype=f64)

    indefinite = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=f64)
    systems = [SPDSolve(spd(3), torch.randn(3, 7, generator=g, dtype=f64), "left"),
               SPDSolve(spd(5), torch.randn(9, 5, generator=g, dtype=f64), "right"),
               SPDSolve(indefinite, torch.randn(3, 4, generator=g, dtype=f64), "left"),
               SPDSolve(spd(3), torch.randn(6, 3, generator=g, dtype=f64), "right")]
    real = torch.linalg.cholesky_ex
    for sync_free in (False, True):  # the host-read fallback (CPU default) and the device-side one (GPUs)
        calls = []
        monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda G, **kw: calls.append(G.shape) or real(G, **kw))
        got = solve_spd_batch(systems, sync_free=sync_free)
        # one batched factorization per bucket (and on the device path one more, of the fallback's G^2 + mu I)
        assert sorted(calls) == sorted([(1, 5, 5), (3, 3, 3)] * (2 if sync_free else 1))
        for s, y in zip(systems, got):
            expected = torch.linalg.solve(s.G, s.R) if s.side == "left" else torch.linalg.solve(s.G.T, s.R.T).T
            torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sync_free", [False, True])
def test_batched_solves_of_singular_and_non_finite_systems(sync_free):
    """A singular SPD-looking system gets the minimum-norm least-squares answer (as lstsq / pinv), a
    non-finite one NaN, and neither disturbs the well-posed system beside it."""
    g = torch.Generator().manual_seed(4)
    singular = torch.zeros(4, 4, dtype=f64)
    singular[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=f64)  # rank 2 of 4: Cholesky fails
    good = singular + torch.eye(4, dtype=f64)
    bad = good.clone()
    bad[0, 1] = bad[1, 0] = float("inf")
    R = torch.randn(4, 3, generator=g, dtype=f64)
    # repeated: LAPACK's default least-squares driver on the CPU (gelsy) got this wrong in about one call of
    # eight, nondeterministically
    for _ in range(64):
        y_singular, y_good, y_bad = solve_spd_batch([SPDSolve(singular, R), SPDSolve(good, R), SPDSolve(bad, R)],
                                                    sync_free=sync_free)
        torch.testing.assert_close(y_singular, torch.linalg.pinv(singular, hermitian=True) @ R, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(y_good, torch.linalg.solve(good, R), rtol=1e-10, atol=1e-10)
        assert torch.isnan(y_bad).all()


def test_rank_deficient_B_with_tiny_lam_stays_finite():
    A, B, Z, X, _, _ = problem(seed=9)
    B[:, 2:] = 0.0  # rank 2 of 5
    A1, B1 = lorsum(A.float(), B.float(), [(-0.1, Z.T.float(), X.float())], lam=1e-12, iters=3)
    assert torch.isfinite(A1).all() and torch.isfinite(B1).all()


def test_rejects_bad_arguments():
    A, B, Z, X, _, _ = problem()
    with pytest.raises(ValueError, match="lam"):
        lorsum(A, B, [], lam=0.0, iters=1)
    with pytest.raises(ValueError, match="iters"):
        lorsum(A, B, [], lam=1.0, iters=-1)
    with pytest.raises(ValueError, match="both"):
        lorsum(A, B, [], lam=1.0, iters=1, d_out=torch.ones(60, dtype=f64))


@pytest.mark.parametrize("iters", [0, 2])
def test_reduce_sums_only_the_local_terms(iters):
    """Two identical 'ranks' each holding half of the gradient: reduce doubles the local products,
    the shared (momentum) term is counted once."""
    A, B, Z, X, F2, H2 = problem(seed=10)
    d = torch.rand(60, dtype=f64) + 0.5, torch.rand(40, dtype=f64) + 0.5
    for metric in (None, d):
        kw = dict(lam=1e-3, iters=iters, d_out=metric and metric[0], d_in=metric and metric[1])
        expected = lorsum(A, B, [(-0.2, Z.T, X), (0.4, F2, H2)], **kw)
        got = lorsum(A, B, [(-0.1, Z.T, X)], shared_terms=[(0.4, F2, H2)], reduce=lambda t: 2 * t, **kw)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("metric", [False, True])
def test_known_products_replace_the_first_products(iters, metric):
    """Passing (B^T G, G A^T), e.g. from autograd's LoRA gradients, gives the same result."""
    A, B, Z, X, _, _ = problem(seed=12)
    d = (torch.rand(60, dtype=f64) + 0.5, torch.rand(40, dtype=f64) + 0.5) if metric else (None, None)
    G = -0.3 * Z.T @ X
    expected = lorsum(A, B, [(-0.3, Z.T, X)], lam=1e-3, iters=iters, d_out=d[0], d_in=d[1])
    got = lorsum(A, B, [(-0.3, Z.T, X)], lam=1e-3, iters=iters, d_out=d[0], d_in=d[1],
                 known_products=(B.T @ G, G @ A.T))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_non_finite_system_gives_nan_not_a_crash():
    G = torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]], dtype=f64)  # Cholesky fails, lstsq would abort
    assert torch.isnan(solve_spd_left(G, torch.ones(2, 1, dtype=f64))).all()


def test_non_finite_right_hand_side_gives_nan_not_a_crash():
    G = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=f64)  # indefinite: the fallback path
    assert torch.isnan(solve_spd_left(G, torch.tensor([[float("nan")], [1.0]], dtype=f64))).all()


def test_svd_project_retries_in_float64_when_float32_fails(monkeypatch):
    """gesdd can fail to converge in float32 on a finite matrix (a 300-step oracle run did): the projection retries in
    float64 and returns the same product; a non-finite target is a one-line error, not a LAPACK message."""
    g = torch.Generator().manual_seed(0)
    T = torch.randn(12, 9, generator=g)
    want_A, want_B = svd_project(T, 3)
    real_svd = torch.linalg.svd

    def failing_in_float32(M, *args, **kwargs):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing_in_float32)
    A, B = svd_project(T, 3)
    assert A.dtype == B.dtype == torch.float32
    torch.testing.assert_close(B @ A, want_B @ want_A, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        svd_project(torch.full((4, 4), float("nan")), 2)
