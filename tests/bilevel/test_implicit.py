"""implicit_root / implicit_fixed_point against closed forms (anchors P1, P2, P6)."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl


def _fixed_point_cos(theta: float) -> torch.Tensor:
    x = torch.tensor(0.0, dtype=torch.float64)
    for _ in range(300):
        x = torch.cos(x) + theta
    return x


@pytest.mark.parametrize(
    "linsolve", [None, bl.Neumann(steps=80, alpha=1.0)], ids=["normal_cg", "neumann"]
)
def test_scalar_fixed_point_x_equals_cos_x_plus_theta(linsolve):
    """P6a: dx*/dtheta = 1 / (1 + sin x*) for a 0-d solution (TorchOpt #222 returned 0)."""
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x_star = _fixed_point_cos(0.3)
    x = bl.implicit_fixed_point(lambda w, t: torch.cos(w) + t, x_star, theta, linsolve=linsolve)
    assert x.shape == () and torch.equal(x.detach(), x_star)
    (d,) = torch.autograd.grad(x, theta)
    jacobian = 1.0 + math.sin(float(x_star))  # dF/dx for F = x - cos x - theta
    expected = 1.0 / jacobian
    if linsolve is not None:  # Neumann's own target: (1 - (1 - dF/dx)^N) / (dF/dx)
        expected = (1.0 - (1.0 - jacobian) ** linsolve.steps) / jacobian
    assert abs(float(d) - expected) < 1e-13


@pytest.mark.parametrize(
    "linsolve", [None, bl.Neumann(steps=200, alpha=1.0)], ids=["normal_cg", "neumann"]
)
def test_affine_contraction_fixed_point(linsolve):
    """P6b: w = s M0 w + b; u = (I - s M0)^-T (w* - t); dL/db = u, dL/ds = u^T M0 w*."""
    gen = torch.Generator().manual_seed(2)
    d = 6
    M0 = torch.randn(d, d, generator=gen, dtype=torch.float64)
    M0 = M0 / torch.linalg.matrix_norm(M0, ord=2)
    meta = {
        "b": torch.randn(d, generator=gen, dtype=torch.float64).requires_grad_(),
        "s": torch.tensor(0.8, dtype=torch.float64, requires_grad=True),
    }
    target = torch.randn(d, generator=gen, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    s, b = meta["s"].detach(), meta["b"].detach()
    w_star = torch.linalg.solve(eye - s * M0, b)

    w = bl.implicit_fixed_point(
        lambda w, m: {"w": m["s"] * M0 @ w["w"] + m["b"]}, {"w": w_star}, meta, linsolve=linsolve
    )["w"]
    loss = 0.5 * ((w - target) ** 2).sum()
    d_b, d_s = torch.autograd.grad(loss, [meta["b"], meta["s"]])
    u = torch.linalg.solve((eye - s * M0).T, w_star - target)
    torch.testing.assert_close(d_b, u, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(d_s, u @ M0 @ w_star, rtol=1e-9, atol=1e-11)


def test_ridge_hypergradient_per_feature_penalty(make_lq):
    """P1 with the solution split into two leaves: dL/dlambda_i = -w*_i v_i, v = A^-1 g."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(30, generator=gen, dtype=torch.float64)
    Xv = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    yv = torch.randn(20, generator=gen, dtype=torch.float64)
    lam = torch.linspace(0.5, 2.0, 5, dtype=torch.float64).requires_grad_()
    A = X.T @ X + torch.diag(lam.detach())
    w_star = torch.linalg.solve(A, X.T @ y)

    def optimality(w, lam):  # gradient of 1/2||Xw - y||^2 + 1/2 sum lam_i w_i^2
        full = torch.cat([w["head"], w["tail"]])
        g = X.T @ (X @ full - y) + lam * full
        return {"head": g[:2], "tail": g[2:]}

    records = []
    for linsolve in (bl.CG(tol=1e-13), bl.NormalCG(tol=1e-13)):
        w = bl.implicit_root(
            optimality,
            {"head": w_star[:2], "tail": w_star[2:]},
            lam,
            linsolve=linsolve,
            symmetric=True,
            on_solve=records.append,
        )
        full = torch.cat([w["head"], w["tail"]])
        (d_lam,) = torch.autograd.grad(0.5 * ((Xv @ full - yv) ** 2).sum(), lam)
        v = torch.linalg.solve(A, Xv.T @ (Xv @ w_star - yv))
        torch.testing.assert_close(d_lam, -w_star * v, rtol=1e-9, atol=1e-12)
    assert [r.converged for r in records] == [True, True]
    assert all(r.residual.grad_fn is None and float(r.residual) < 1e-13 for r in records)


def test_non_symmetric_root_and_refusal_of_cg():
    """F(w, theta) = A w - B theta - c with non-symmetric A: dw*/dtheta = A^-1 B."""
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        4, dtype=torch.float64
    )
    B = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    c = torch.randn(4, generator=gen, dtype=torch.float64)
    theta = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    w_star = torch.linalg.solve(A, B @ theta.detach() + c)

    def optimality(w, th):
        return A @ w - B @ th - c

    with pytest.raises(ValueError, match="CG assumes a symmetric positive-definite Jacobian"):
        bl.implicit_root(optimality, w_star, theta, linsolve=bl.CG())
    w = bl.implicit_root(optimality, w_star, theta, linsolve=bl.NormalCG(tol=1e-13))
    cotangent = torch.randn(4, generator=gen, dtype=torch.float64)
    (d_theta,) = torch.autograd.grad(w, theta, cotangent)
    torch.testing.assert_close(
        d_theta, B.T @ torch.linalg.solve(A.T, cotangent), rtol=1e-9, atol=1e-12
    )


def test_solution_graph_is_ignored_and_composes_with_torch_func(make_lq):
    """The solver's own graph must not leak in: a solution computed differentiably from theta gets
    exactly the IFT gradient; torch.func.grad and vmap agree with autograd and a loop."""
    lq = make_lq()

    def optimality(w, th):
        return lq.A @ w - lq.B @ th - lq.c

    def hyper(th):
        w_star = lq.w_star(th)  # differentiable in th; implicit_root detaches it
        w = bl.implicit_root(optimality, w_star, th, linsolve=bl.CG(tol=1e-13), symmetric=True)
        return 0.5 * ((w - lq.w_t) ** 2).sum()

    theta = lq.theta.clone().requires_grad_()
    (by_autograd,) = torch.autograd.grad(hyper(theta), theta)
    expected = lq.B.T @ torch.linalg.solve(lq.A, lq.w_star(lq.theta) - lq.w_t)
    torch.testing.assert_close(by_autograd, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.grad(hyper)(lq.theta), expected, rtol=1e-10, atol=1e-12)
    thetas = torch.stack([lq.theta, -lq.theta, 2 * lq.theta])
    batched = torch.func.vmap(torch.func.grad(hyper))(thetas)
    looped = torch.stack([torch.func.grad(hyper)(t) for t in thetas])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)


def test_implicit_root_validates_arguments():
    w = torch.zeros(2)
    with pytest.raises(TypeError, match="optimality_fn must be callable"):
        bl.implicit_root(None, w, w)
    with pytest.raises(ValueError, match="needs meta"):
        bl.implicit_root(lambda w, m: w, w, None)
    with pytest.raises(TypeError, match=r"solution must be a dict\[str, Tensor\]"):
        bl.implicit_root(lambda w, m: w, [w], w)
    theta = torch.zeros(2, requires_grad=True)
    out = bl.implicit_root(lambda w, m: {"x": w}, w, theta)
    with pytest.raises(
        ValueError, match="optimality_fn output and solution must have the same keys"
    ):
        torch.autograd.grad(out.sum(), theta)
