"""solve() in every mode against the exact targets of anchors §3.2 (P1-P4), in float64.

Each approximate mode is checked against its *own* closed form (unrolled-K, truncated-T,
Neumann-N, damped, first-order, heavy-ball), not loosely against the limit.
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

ALPHA = 0.05  # inner step; A has eigenvalues in [1, 10], so M = I - alpha A is a contraction


def _hypergradient(lq, mode, *, steps, optimizer=None, w0=None):
    theta = lq.theta.clone().requires_grad_()
    params0 = lq.tree(lq.w0 if w0 is None else w0)
    optimizer = optimizer or bl.sgd(ALPHA)
    params_K = bl.solve(lq.inner, params0, theta, optimizer=optimizer, steps=steps, mode=mode)
    (grad,) = torch.autograd.grad(lq.outer(params_K, theta), theta)
    return grad, lq.vector(params_K).detach()


@pytest.mark.parametrize("K", [1, 5, 50])
def test_p2_unrolled(make_lq, K):
    """(b) grad = B^T (I - M^K) A^-1 (w_K - w_t) + D theta, with multi-leaf coupled params."""
    lq = make_lq()
    grad, w_K = _hypergradient(lq, bl.Unrolled(), steps=K)
    torch.testing.assert_close(w_K, lq.gd_iterate(lq.theta, ALPHA, K), rtol=1e-12, atol=1e-13)
    MK = torch.linalg.matrix_power(lq.M(ALPHA), K)
    eye = torch.eye(lq.d, dtype=torch.float64)
    expected = lq.B.T @ (eye - MK) @ torch.linalg.solve(lq.A, w_K - lq.w_t) + lq.D @ lq.theta
    torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("K,T", [(10, 1), (10, 4), (10, 10)])
def test_p2_truncated(make_lq, K, T):
    """(c) grad = B^T A^-1 (I - M^T) (w_K - w_t) + D theta; Truncated(K) is exactly Unrolled."""
    lq = make_lq()
    grad, w_K = _hypergradient(lq, bl.Truncated(T), steps=K)
    MT = torch.linalg.matrix_power(lq.M(ALPHA), T)
    eye = torch.eye(lq.d, dtype=torch.float64)
    expected = lq.B.T @ torch.linalg.solve(lq.A, (eye - MT) @ (w_K - lq.w_t)) + lq.D @ lq.theta
    torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-12)
    if T == K:
        unrolled, _ = _hypergradient(lq, bl.Unrolled(), steps=K)
        torch.testing.assert_close(grad, unrolled, rtol=0, atol=0)


def _converged_w0(lq):
    """Start at w* so that the implicit modes are evaluated exactly where their formulas hold."""
    return lq.w_star(lq.theta)


@pytest.mark.parametrize(
    "linsolve,target",
    [
        (bl.CG(tol=1e-13), "exact"),
        (bl.NormalCG(tol=1e-13), "exact"),
        (bl.CG(tol=1e-13, damping=0.4), "damped"),
        (bl.Neumann(steps=7, alpha=ALPHA), "neumann"),
    ],
    ids=["cg", "normal_cg", "damped", "neumann"],
)
def test_p2_implicit(make_lq, linsolve, target):
    """(a) exact; (d) Neumann-N: B^T (I - M^N) A^-1 (w* - w_t); (f) damped: B^T (A + mu I)^-1."""
    lq = make_lq()
    grad, w_K = _hypergradient(lq, bl.Implicit(linsolve=linsolve), steps=3, w0=_converged_w0(lq))
    eye = torch.eye(lq.d, dtype=torch.float64)
    residual = w_K - lq.w_t
    if target == "exact":
        v = torch.linalg.solve(lq.A, residual)
    elif target == "damped":
        v = torch.linalg.solve(lq.A + 0.4 * eye, residual)
    else:
        v = (eye - torch.linalg.matrix_power(lq.M(ALPHA), 7)) @ torch.linalg.solve(lq.A, residual)
    torch.testing.assert_close(grad, lq.B.T @ v + lq.D @ lq.theta, rtol=1e-10, atol=1e-12)


def test_p2_neumann_at_w_star_equals_unrolling_from_w_star(make_lq):
    """Lorraine et al.: Neumann-N at w* is N-step unrolling started at w* (cross-mode check)."""
    lq = make_lq()
    w_star = _converged_w0(lq)
    neumann, _ = _hypergradient(
        lq, bl.Implicit(bl.Neumann(steps=6, alpha=ALPHA)), steps=1, w0=w_star
    )
    unrolled, _ = _hypergradient(lq, bl.Unrolled(), steps=6, w0=w_star)
    torch.testing.assert_close(neumann, unrolled, rtol=1e-10, atol=1e-12)


def test_p2_first_order_is_degenerate_and_warns(make_lq):
    """(g) FO ignores dw/dtheta: grad = D theta, and meta can receive nothing through the loop."""
    lq = make_lq()
    with pytest.warns(bl.BilevelWarning, match="FirstOrder mode gives meta no gradient"):
        grad, _ = _hypergradient(lq, bl.FirstOrder(), steps=5)
    torch.testing.assert_close(grad, lq.D @ lq.theta, rtol=0, atol=0)


def test_p2_heavy_ball_momentum(make_lq):
    """(h) z = (w, m), G = [[I - aA, -a b I], [A, b I]], H = [[aI], [-I]], S = sum_{j<K} G^j H:
    grad = B^T S_w^T (w_K - w_t) + D theta (torch.optim.SGD momentum convention)."""
    lq = make_lq()
    K, beta = 8, 0.7
    grad, w_K = _hypergradient(lq, bl.Unrolled(), steps=K, optimizer=bl.sgd(ALPHA, momentum=beta))
    d = lq.d
    eye = torch.eye(d, dtype=torch.float64)
    G = torch.cat(
        [torch.cat([eye - ALPHA * lq.A, -ALPHA * beta * eye], 1), torch.cat([lq.A, beta * eye], 1)]
    )
    H = torch.cat([ALPHA * eye, -eye])
    S = sum(torch.linalg.matrix_power(G, j) @ H for j in range(K))
    expected = lq.B.T @ S[:d].T @ (w_K - lq.w_t) + lq.D @ lq.theta
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_p2_zero_dimensional_params_and_meta():
    """Scalar w and theta (0-d tensors) in unrolled and implicit modes."""
    a, b, c, t = 2.0, 1.5, 0.3, 0.7
    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def inner(p, th, data):
        return 0.5 * a * p["w"] ** 2 - p["w"] * (b * th + c)

    w0 = {"w": torch.tensor(1.0, dtype=torch.float64)}
    K, lr = 6, 0.2
    w_K = bl.solve(inner, w0, theta, optimizer=bl.sgd(lr), steps=K)["w"]
    assert w_K.shape == ()
    (grad,) = torch.autograd.grad(0.5 * (w_K - t) ** 2, theta)
    m = 1 - lr * a
    torch.testing.assert_close(grad, b * (1 - m**K) / a * (w_K.detach() - t), rtol=1e-12, atol=0)

    w_star = torch.tensor((b * 0.4 + c) / a, dtype=torch.float64)
    w_K = bl.solve(inner, {"w": w_star}, theta, optimizer=bl.sgd(lr), steps=1, mode=bl.Implicit())[
        "w"
    ]
    (grad,) = torch.autograd.grad(0.5 * (w_K - t) ** 2, theta)
    torch.testing.assert_close(grad, b / a * (w_star - t), rtol=1e-12, atol=0)


def test_params0_gradient_per_mode(make_lq):
    """dL/dw_0: Unrolled gives M^K (w_K - w_t); Truncated(T < K) and Implicit give none;
    FirstOrder gives the identity, i.e. (w_K - w_t)."""
    lq = make_lq()
    K = 6

    def grad_w0(mode):
        w0 = lq.w0.clone().requires_grad_()
        theta = lq.theta.clone().requires_grad_()
        params_K = bl.solve(
            lq.inner, lq.tree(w0), theta, optimizer=bl.sgd(ALPHA), steps=K, mode=mode
        )
        w_K = lq.vector(params_K)
        g, _ = torch.autograd.grad(lq.outer(params_K, theta), [w0, theta], allow_unused=True)
        return g, w_K.detach()

    g, w_K = grad_w0(bl.Unrolled())
    MK = torch.linalg.matrix_power(lq.M(ALPHA), K)
    torch.testing.assert_close(g, MK @ (w_K - lq.w_t), rtol=1e-11, atol=1e-13)
    assert grad_w0(bl.Truncated(3))[0] is None
    assert grad_w0(bl.Implicit(stationarity_rtol=float("inf")))[0] is None
    with pytest.warns(bl.BilevelWarning, match="FirstOrder mode gives meta no gradient"):
        g, w_K = grad_w0(bl.FirstOrder())
    torch.testing.assert_close(g, w_K - lq.w_t, rtol=1e-14, atol=0)


# --- P3: MAML / FOMAML / iMAML on quadratic tasks (meta-parameter = initialisation) ---------


def _quadratic_tasks(spd, n_tasks=3, d=4, seed=11):
    gen = torch.Generator().manual_seed(seed)
    A = torch.stack([spd(d, 5.0, gen) for _ in range(n_tasks)])
    H = torch.stack([spd(d, 3.0, gen) for _ in range(n_tasks)])
    c, dq = (torch.randn(n_tasks, d, generator=gen, dtype=torch.float64) for _ in range(2))
    theta = torch.randn(d, generator=gen, dtype=torch.float64)
    return A, H, c, dq, theta


def _support(p, meta, task):
    A, c = task[0], task[1]
    r = p["w"] - c
    return 0.5 * r @ A @ r


def _query(w, H, dq):
    r = w - dq
    return 0.5 * r @ H @ r


def test_p3_maml_fomaml_and_truncated_detach(spd):
    """MAML grad = sum_i M_i^K H_i (w_K^i - d_i); FOMAML = sum_i H_i (w_K^i - d_i);
    truncated with detach semantics = 0 for an initialisation meta-parameter."""
    A, H, c, dq, theta = _quadratic_tasks(spd)
    K, lr = 4, 0.1

    def meta_loss(th, mode):
        def task_loss(A_i, H_i, c_i, d_i):
            w = bl.solve(
                _support, {"w": th}, None, optimizer=bl.sgd(lr), steps=K, mode=mode, data=(A_i, c_i)
            )
            return _query(w["w"], H_i, d_i)

        return torch.func.vmap(task_loss)(A, H, c, dq).sum()

    eye = torch.eye(4, dtype=torch.float64)
    M = eye - lr * A
    MK = torch.linalg.matrix_power(M, K)
    w_K = c + torch.einsum("tij,tj->ti", MK, theta - c)
    query_grad = torch.einsum("tij,tj->ti", H, w_K - dq)
    maml = torch.func.grad(meta_loss)(theta, bl.Unrolled())
    torch.testing.assert_close(
        maml, torch.einsum("tij,tj->i", MK, query_grad), rtol=1e-11, atol=1e-12
    )
    fomaml = torch.func.grad(meta_loss)(theta, bl.FirstOrder())
    torch.testing.assert_close(fomaml, query_grad.sum(0), rtol=1e-12, atol=1e-13)
    truncated = torch.func.grad(meta_loss)(theta, bl.Truncated(2))
    torch.testing.assert_close(truncated, torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)


def test_p3_imaml(spd):
    """iMAML: proximal inner f_i(w) + lam/2 ||w - theta||^2, w_i* = (A_i + lam I)^-1 (A_i c_i +
    lam theta), grad = sum_i lam (A_i + lam I)^-1 H_i (w_i* - d_i)."""
    A, H, c, dq, theta = _quadratic_tasks(spd)
    lam = 2.0
    eye = torch.eye(4, dtype=torch.float64)
    theta = theta.clone().requires_grad_()

    def proximal(p, th, task):
        return _support(p, th, task) + 0.5 * lam * ((p["w"] - th) ** 2).sum()

    total, expected = 0.0, torch.zeros(4, dtype=torch.float64)
    for i in range(A.shape[0]):
        w_i = bl.solve(
            proximal,
            {"w": theta.detach()},
            theta,
            optimizer=bl.sgd(0.07, momentum=0.5),
            steps=150,
            mode=bl.Implicit(bl.CG(tol=1e-13), stationarity_rtol=1e-10),
            data=(A[i], c[i]),
        )["w"]
        w_star = torch.linalg.solve(A[i] + lam * eye, A[i] @ c[i] + lam * theta.detach())
        torch.testing.assert_close(w_i.detach(), w_star, rtol=1e-11, atol=1e-12)
        total = total + _query(w_i, H[i], dq[i])
        expected += lam * torch.linalg.solve(A[i] + lam * eye, H[i] @ (w_star - dq[i]))
    (grad,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# --- P4: hypergradient w.r.t. the inner learning rate -------------------------------------


def _scalar_problem():
    a, b, w0, t = 2.0, 1.0, 3.0, 0.2

    def inner(p, meta, data):
        return 0.5 * a * p["w"] ** 2 - b * p["w"]

    return a, b, w0, t, inner


def test_p4_learning_rate_hypergradient():
    """w_K = w* + (1 - eta a)^K (w0 - w*): dL/deta = (w_K - t)(-K a (1 - eta a)^(K-1) (w0 - w*)).
    The anchors' value for a=2, b=1, w0=3, t=0.2, K=10, eta=0.15 is -0.747790294817164."""
    a, b, w0, t, inner = _scalar_problem()
    K = 10
    eta = torch.tensor(0.15, dtype=torch.float64, requires_grad=True)
    w_K = bl.solve(
        inner, {"w": torch.tensor(w0, dtype=torch.float64)}, None, optimizer=bl.sgd(eta), steps=K
    )["w"]
    (grad,) = torch.autograd.grad(0.5 * (w_K - t) ** 2, eta)
    w_star = b / a
    closed = (float(w_K.detach()) - t) * (-K * a * (1 - 0.15 * a) ** (K - 1) * (w0 - w_star))
    assert abs(float(grad) - closed) < 1e-13
    assert abs(float(grad) - -0.747790294817164) < 1e-12


def test_p4_momentum_learning_rate_hypergradient():
    """SGD with momentum beta: forward-mode tangent recursion as the reference,
    m_k = beta m_{k-1} + a w_{k-1} - b, w_k = w_{k-1} - eta m_k;
    dm_k = beta dm_{k-1} + a dw_{k-1}, dw_k = dw_{k-1} - m_k - eta dm_k (d = d/deta)."""
    a, b, w0, t, inner = _scalar_problem()
    K, eta0, beta = 12, 0.15, 0.6
    eta = torch.tensor(eta0, dtype=torch.float64, requires_grad=True)
    optimizer = bl.sgd(eta, momentum=beta)
    w_K = bl.solve(
        inner, {"w": torch.tensor(w0, dtype=torch.float64)}, None, optimizer=optimizer, steps=K
    )["w"]
    (grad,) = torch.autograd.grad(0.5 * (w_K - t) ** 2, eta)
    w, m, dw, dm = w0, 0.0, 0.0, 0.0
    for _ in range(K):
        m_new = beta * m + a * w - b
        dm = beta * dm + a * dw
        m = m_new
        dw = dw - m - eta0 * dm
        w = w - eta0 * m
    assert abs(float(w_K.detach()) - w) < 1e-13
    assert abs(float(grad) - (w - t) * dw) < 1e-13


# --- P1: ridge penalty learned with Implicit mode through solve() --------------------------


def test_p1_ridge_through_solve():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(30, generator=gen, dtype=torch.float64)
    Xv = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    yv = torch.randn(20, generator=gen, dtype=torch.float64)
    lam = torch.linspace(0.5, 2.0, 5, dtype=torch.float64).requires_grad_()

    def ridge(p, lam, data):
        X, y = data
        return 0.5 * ((X @ p["w"] - y) ** 2).sum() + 0.5 * (lam * p["w"] ** 2).sum()

    A = X.T @ X + torch.diag(lam.detach())
    lr = 1.0 / float(torch.linalg.eigvalsh(A)[-1])
    w_star = torch.linalg.solve(A, X.T @ y)
    v = torch.linalg.solve(A, Xv.T @ (Xv @ w_star - yv))
    N, alpha = 40, lr
    M = torch.eye(5, dtype=torch.float64) - alpha * A
    v_neumann = (torch.eye(5, dtype=torch.float64) - torch.linalg.matrix_power(M, N)) @ v
    for linsolve, v_target in (
        (bl.CG(tol=1e-13), v),
        (bl.Neumann(steps=N, alpha=alpha), v_neumann),
    ):
        w = bl.solve(
            ridge,
            {"w": torch.zeros(5, dtype=torch.float64)},
            lam,
            optimizer=bl.sgd(lr, momentum=0.9),
            steps=400,
            mode=bl.Implicit(linsolve, stationarity_rtol=1e-9),
            data=(X, y),
        )["w"]
        (grad,) = torch.autograd.grad(0.5 * ((Xv @ w - yv) ** 2).sum(), lam)
        torch.testing.assert_close(grad, -w_star * v_target, rtol=1e-9, atol=1e-12)
