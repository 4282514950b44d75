"""Dense float64 reference implementations of every step: the documented definition the fast path
is held to (as Dion ships ``dion_reference``). Use it to check a change, a new engine or another
library against: ``tests/test_lorsum.py`` and ``tests/test_optimizers.py`` hold every optimizer to it.

Everything here forms the ``m x n`` matrices (the gradient ``P``, the target ``T``) and uses
``torch.linalg.solve`` / ``torch.linalg.svd``: small layers only. Nothing is shared with the fast path
in ``psilora_ds.ops`` except the mathematical definitions of METHOD.md.
"""

from __future__ import annotations

import torch

f64 = torch.float64


def lorsum_dense(A, B, T, *, lam, iters, d_out=None, d_in=None):
    """Proximal ALS on a dense target ``T`` (already ``T~`` for the metric case), METHOD.md 2 and 4.

    A-step: ``(Bt^T Do Bt + lam I) A+ = lam A + Bt^T Do T``; B-step: ``B+ (A+ Di A+^T + lam I) = lam B + T Di A+^T``.
    """
    A, B, T = A.to(f64), B.to(f64), T.to(f64)
    Do = torch.diag(d_out.to(f64)) if d_out is not None else torch.eye(B.shape[0], dtype=f64)
    Di = torch.diag(d_in.to(f64)) if d_in is not None else torch.eye(A.shape[1], dtype=f64)
    eye = torch.eye(A.shape[0], dtype=f64)

    def a_step(Bt):
        return torch.linalg.solve(Bt.T @ Do @ Bt + lam * eye, lam * A + Bt.T @ Do @ T)

    def b_step(At):
        return torch.linalg.solve(At @ Di @ At.T + lam * eye, (lam * B + T @ Di @ At.T).T).T

    if iters == 0:
        return a_step(B), b_step(A)
    Bt = B
    for _ in range(iters):
        At = a_step(Bt)
        Bt = b_step(At)
    return At, Bt


def svd_truncate(T, rank):
    """Truncated SVD of dense ``T``: ``(A, B)`` with ``B A = U_r S_r V_r^T``, balanced."""
    U, S, Vh = torch.linalg.svd(T.to(f64), full_matrices=False)
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root


def sketched_spectral_step_dense(T, rank, omega, psi, d_out=None, d_in=None):
    """The cache-free spectral first step (METHOD.md 5) on the dense target ``T`` (already ``T~`` in the metric case):
    ``S = D_out^1/2 T D_in^1/2`` sketched as ``Y = S Omega~``, ``W = Psi~ S`` with ``Omega~ = D_in^1/2 Omega``,
    ``Psi~ = Psi D_out^1/2``; ``S^ = Q (Psi~ Q)^+ W`` with ``Q`` an orthonormal basis of ``range(Y)``; the result is
    ``D_out^-1/2 svd_r(S^) D_in^-1/2`` as ``(A, B)`` (Tropp, Yurtsever, Udell, Cevher 2017)."""
    T, omega, psi = T.to(f64), omega.to(f64), psi.to(f64)
    so = torch.ones(T.shape[0], dtype=f64) if d_out is None else d_out.to(f64).sqrt()
    si = torch.ones(T.shape[1], dtype=f64) if d_in is None else d_in.to(f64).sqrt()
    S = so[:, None] * T * si[None, :]
    psi_t = psi * so[None, :]
    Y, W = S @ (si[:, None] * omega), psi_t @ S
    Q = torch.linalg.svd(Y, full_matrices=False)[0]  # (Y has full column rank almost surely)
    S_hat = Q @ torch.linalg.pinv(psi_t @ Q) @ W
    A, B = svd_truncate(S_hat, rank)
    return A / si[None, :], B / so[:, None]


def momentum_lam(M, lam, momentum_prox):
    """The momentum update's proximal weight ``max(lam, momentum_prox * mean singular value of M)`` (METHOD.md 3),
    from the SVD of the dense product."""
    if M is None or momentum_prox <= 0:
        return lam
    r_m = M[0].shape[0]
    return max(lam, momentum_prox * float(torch.linalg.svdvals(M[1].to(f64) @ M[0].to(f64))[:r_m].sum()) / r_m)


def psilora_step(A, B, P, *, scaling, lr, momentum=0.0, dampening=0.0, iters=1, lam, M=None, momentum_prox=0.0):
    """One PSI-LoRA step on dense ``P`` (METHOD.md 3). ``M`` = ``(M_A, M_B)`` or None.
    Returns ``(A', B', M')``."""
    eta = lr / scaling**2
    A, B, P = A.to(f64), B.to(f64), P.to(f64)
    Md = M[1].to(f64) @ M[0].to(f64) if M is not None else torch.zeros_like(P)
    T = B @ A - eta * (1 - dampening) * P - eta * momentum * Md
    A_new, B_new = lorsum_dense(A, B, T, lam=lam, iters=iters)
    M_new = None
    if M is not None:
        M_new = balanced(*lorsum_dense(M[0].to(f64), M[1].to(f64), momentum * Md + (1 - dampening) * P,
                                       lam=momentum_lam(M, lam, momentum_prox), iters=iters))
    return A_new, B_new, M_new


def balanced(A, B):
    """The momentum factors re-factored as the truncated SVD of their product (METHOD.md 3, gauge):
    ``B' A' = B A`` with ``B' = U S^1/2``, ``A' = S^1/2 V^T`` (a zero product is left as it is)."""
    product = B.to(f64) @ A.to(f64)
    if not product.any():
        return A, B
    return svd_truncate(product, A.shape[0])


def kfac_diagonal_stats(X, Z, scaling):
    """``(mean_rows x^2, E[g^2])`` with per-example output gradients ``N z / scaling`` (METHOD.md 4)."""
    X, Z = X.to(f64), Z.to(f64)
    N = X.shape[0]
    return (X**2).mean(0), ((N * Z / scaling) ** 2).mean(0)


def shampoo_diagonal_stats(P, scaling):
    """``(diag(G^T G), diag(G G^T))`` with the dense ``G = P / scaling``."""
    G = P.to(f64) / scaling
    return torch.diagonal(G.T @ G), torch.diagonal(G @ G.T)


def adafactor_diagonal_stats(P, omega, psi, scaling):
    """``(C (n,), R (m,))``: the column and row sums of squares of ``G = P / scaling`` estimated from the dense
    sketches ``G Omega`` (m x k) and ``Psi G`` (l x n) (METHOD.md 4, Adafactor metric)."""
    G = P.to(f64) / scaling
    Y, W = G @ omega.to(f64), psi.to(f64) @ G
    return (W**2).sum(0) / W.shape[0], (Y**2).sum(1) / Y.shape[1]


def scaled_psilora_step(A, B, P, D_out, D_in, *, scaling, lr, beta1, iters, lam, M=None, momentum_prox=0.0):
    """One Scaled PSI-LoRA step on dense ``P`` given the final metric diagonals (METHOD.md 4)."""
    eta = lr / scaling**2
    A, B, P = A.to(f64), B.to(f64), P.to(f64)
    Do, Di = D_out.to(f64), D_in.to(f64)
    Md = M[1].to(f64) @ M[0].to(f64) if M is not None else torch.zeros_like(P)
    step = (1 - beta1) * P + beta1 * Md
    T = B @ A - eta * (step / Do[:, None]) / Di[None, :]
    A_new, B_new = lorsum_dense(A, B, T, lam=lam, iters=iters, d_out=Do, d_in=Di)
    M_new = None
    if M is not None:
        M_new = balanced(*lorsum_dense(M[0].to(f64), M[1].to(f64), step, lam=momentum_lam(M, lam, momentum_prox),
                                       iters=iters))
    return A_new, B_new, M_new


def svdlora_step(A, B, P, *, scaling, lr):
    """``svd_r(B A - lr / scaling^2 * P)``."""
    T = B.to(f64) @ A.to(f64) - lr / scaling**2 * P.to(f64)
    return svd_truncate(T, A.shape[0])


def clip_coefficient(dense_grads, max_norm):
    """torch's clip_grad_norm_ coefficient for the dense gradients ``dense_grads``."""
    norm = torch.sqrt(sum((g.to(f64) ** 2).sum() for g in dense_grads))
    return min(1.0, max_norm / (float(norm) + 1e-6)), float(norm)


def ema_metric(ema, stat, *, beta2, step, damping, power, corrected=True, normalized=False):
    """EMA of a metric statistic, Adam-style bias correction (unless ``corrected=False``: an EMA started at
    ones, the paper authors' code), damping and fractional power. ``normalized``: divided by the root of its sum
    before the damping (the Adafactor metric). Returns ``(new_ema, D)``."""
    ema = beta2 * ema.to(f64) + (1 - beta2) * stat.to(f64)
    value = ema / ((1 - beta2**step) if corrected else 1.0)
    if normalized:
        value = value / value.sum().sqrt()
    return ema, (value + damping) ** power


def landing_field_dense(X, D, lam):
    """The landing field with its n x n skew matrix formed: ``(D X^T - X D^T) X + lam X (X^T X - I)`` (float64)."""
    X, D = X.double(), D.double()
    eye = torch.eye(X.shape[1], dtype=torch.float64)
    return (D @ X.T - X @ D.T) @ X + lam * X @ (X.T @ X - eye)


def polar_step_dense(A, S, B, P, state, *, lr, betas, eps, lam, weight_decay, core="full"):
    """PoLAR's step from the gradient ``P`` (m x n, w.r.t. the product ``B S A``), everything formed densely in
    float64: the Euclidean gradients ``P (S A)^T``, ``(B S)^T P``, ``B^T P A^T`` (its diagonal alone with
    ``core="diag"``); the landing fields of ``B`` and
    ``A^T`` (:func:`landing_field_dense`); AdamW on the fields and on ``S``'s gradient (weight decay on ``S`` only).
    ``state``: ``{"step", "m_A", "v_A", "m_S", "v_S", "m_B", "v_B"}`` (updated); returns ``(A, S, B)``."""
    A, S, B, P = (t.double() for t in (A, S, B, P))
    D_S = B.T @ P @ A.T
    directions = {"A": landing_field_dense(A.T, ((B @ S).T @ P).T, lam).T,
                  "S": D_S * torch.eye(D_S.shape[0], dtype=torch.float64) if core == "diag" else D_S,
                  "B": landing_field_dense(B, P @ (S @ A).T, lam)}
    state["step"] += 1
    t, (b1, b2) = state["step"], betas
    out = {}
    for name, x in (("A", A), ("S", S), ("B", B)):
        g = directions[name]
        state[f"m_{name}"] = b1 * state[f"m_{name}"] + (1 - b1) * g
        state[f"v_{name}"] = b2 * state[f"v_{name}"] + (1 - b2) * g * g
        m_hat, v_hat = state[f"m_{name}"] / (1 - b1**t), state[f"v_{name}"] / (1 - b2**t)
        decay = weight_decay if name == "S" else 0.0
        out[name] = x * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
    return out["A"], out["S"], out["B"]
