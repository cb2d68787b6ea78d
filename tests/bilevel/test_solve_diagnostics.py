"""solve() for users coming from other libraries: one answer eagerly and under vmap (indefinite
systems included), per-task diagnostics under vmap, warm starts without a false stationarity
warning, and errors that name the expected form of the arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bilevel as bl

# --- errors that say what to write -----------------------------------------------------------


def test_a_wrong_inner_loss_arity_names_the_expected_signature():
    w0 = {"w": torch.zeros(2)}
    for wrong in (lambda p, m: (p["w"] ** 2).sum(), lambda p: (p["w"] ** 2).sum()):
        with pytest.raises(TypeError, match=r"inner_loss\(params, meta, data\)"):
            bl.solve(wrong, w0, None, optimizer=bl.sgd(0.1), steps=1)

    def needs_keyword(p, m, d, *, scale):
        return scale * (p["w"] ** 2).sum()

    with pytest.raises(TypeError, match=r"needs_keyword\(p, m, d, \*, scale\) does not"):
        bl.solve(needs_keyword, w0, None, optimizer=bl.sgd(0.1), steps=1)
    # defaults, *args and callables objects with the right arity are accepted
    bl.solve(lambda p, *rest: (p["w"] ** 2).sum(), w0, None, optimizer=bl.sgd(0.1), steps=1)
    bl.solve(lambda p, m, d, e=1: (p["w"] ** 2).sum(), w0, None, optimizer=bl.sgd(0.1), steps=1)


def test_params0_given_a_module_or_its_parameters_says_named_parameters():
    net = nn.Linear(2, 1)

    def loss(p, m, d):
        return torch.func.functional_call(net, p, (torch.ones(1, 2),)).sum()

    for wrong in (net, net.parameters(), list(net.parameters()), tuple(net.parameters())):
        with pytest.raises(TypeError, match=r"dict\(module.named_parameters\(\)\)"):
            bl.solve(loss, wrong, None, optimizer=bl.sgd(0.1), steps=1)
    bl.solve(loss, dict(net.named_parameters()), None, optimizer=bl.sgd(0.1), steps=1)


def test_stationarity_scale_is_validated():
    for bad in (0.0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="stationarity_scale must be None or a finite"):
            bl.Implicit(stationarity_scale=bad)


# --- one answer eagerly and under vmap, on indefinite systems --------------------------------


def _saddle(seed: int, d: int = 6):
    """f(w, theta) = 1/2 w^T A w - theta^T w with A symmetric indefinite: w* = A^-1 theta is a
    saddle point (an unconverged iMAML inner solve on a ReLU net meets such Hessians)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eigenvalues = torch.tensor([-2.0, -0.7, 0.5, 1.0, 2.5, 4.0], dtype=torch.float64)[:d]
    A = Q @ torch.diag(eigenvalues) @ Q.T
    theta = torch.randn(d, generator=gen, dtype=torch.float64)
    target = torch.randn(d, generator=gen, dtype=torch.float64)
    return A, theta, target


def _saddle_task(linsolve):
    def task(theta, A, target, w_star):
        def inner(p, th, data):
            return 0.5 * p["w"] @ A @ p["w"] - th @ p["w"]

        params, info = bl.solve(  # from the stationary point w* = A^-1 theta
            inner,
            {"w": w_star},
            theta,
            optimizer=bl.sgd(0.01),
            steps=2,
            mode=bl.Implicit(linsolve),
            return_info=True,
        )
        return 0.5 * ((params["w"] - target) ** 2).sum(), info

    return torch.func.grad(task, has_aux=True)


@pytest.mark.parametrize("maxiter", [30, 3], ids=["converged", "not_converged"])
def test_implicit_cg_gives_one_answer_eagerly_and_vmapped_on_an_indefinite_hessian(maxiter):
    """dL/dtheta = A^-1 (w* - target) (dense). Eager CG used to stop at the first non-positive
    curvature and return far from it; now the eager task equals the same task inside a vmapped
    batch, and both equal the dense solve once CG converges."""
    tasks = [_saddle(seed) for seed in range(3)]
    As, thetas, targets = (torch.stack(column) for column in zip(*tasks))
    w_stars = torch.linalg.solve(As, thetas.unsqueeze(-1)).squeeze(-1)
    hypergradient = _saddle_task(bl.CG(maxiter=maxiter, tol=1e-12))
    batched, batched_info = torch.func.vmap(hypergradient)(thetas, As, targets, w_stars)
    assert batched_info["linsolve_iterations"].shape == (3,)
    for i, (A, theta, target) in enumerate(tasks):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eager, info = hypergradient(theta, A, target, w_stars[i])
        assert any("non-positive curvature" in str(w.message) for w in caught)
        torch.testing.assert_close(batched[i], eager, rtol=1e-9, atol=1e-11)
        assert bool(info["linsolve_nonpositive_curvature"])
        for key in ("linsolve_nonpositive_curvature", "linsolve_iterations", "linsolve_converged"):
            assert torch.equal(batched_info[key][i], info[key]), key
        dense = torch.linalg.solve(A, w_stars[i] - target)
        if maxiter == 30:
            assert bool(info["linsolve_converged"])
            torch.testing.assert_close(eager, dense, rtol=1e-9, atol=1e-10)
        else:
            assert not bool(info["linsolve_converged"])
            assert float(info["linsolve_residual"]) > 1e-6


# --- diagnostics under vmap ------------------------------------------------------------------


def test_under_vmap_each_task_reports_stationarity_and_its_linear_solve():
    """Per-task tensors: a task whose inner loop is cut short shows up as not stationary, with
    its final gradient norm, and every task's CG residual and iteration count are there."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 2.0, 0.01], dtype=torch.float64)  # the last converges slowly
    targets = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    def task(scale, target):
        def inner(p, s, data):
            return 0.5 * s * ((p["w"] - target) ** 2).sum() + 0.05 * (p["w"] ** 2).sum()

        params, info = bl.solve(
            inner,
            {"w": torch.zeros(4, dtype=torch.float64)},
            scale,
            optimizer=bl.sgd(0.4),
            steps=30,
            mode=bl.Implicit(bl.CG(maxiter=10, tol=1e-10)),
            return_info=True,
        )
        return params["w"].sum(), info

    _, info = torch.func.vmap(torch.func.grad(task, has_aux=True))(scales, targets)
    assert info["stationary"].tolist() == [True, True, False]
    assert info["final_grad_norm"].shape == (3,) and float(info["final_grad_norm"][2]) > 1e-3
    assert info["linsolve_converged"].dtype == torch.bool and info["linsolve_converged"].all()
    assert (info["linsolve_residual"] <= 1e-10).all()
    assert info["linsolve_iterations"].dtype == torch.long
    assert (info["linsolve_iterations"] >= 1).all()
    assert not info["linsolve_nonpositive_curvature"].any()
    for i in range(3):  # the same values as each task alone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bl.BilevelWarning)
            _, single = torch.func.grad(task, has_aux=True)(scales[i], targets[i])
        assert bool(info["stationary"][i]) == bool(single["stationary"])
        assert torch.equal(info["linsolve_iterations"][i], single["linsolve_iterations"])
        torch.testing.assert_close(info["final_grad_norm"][i], single["final_grad_norm"])


# --- warm starts -----------------------------------------------------------------------------


def test_a_warm_started_implicit_loop_passes_the_check_with_a_stationarity_scale():
    """Ridge penalty learning, 10 inner steps per outer step, each warm-started from the previous
    solution (ill-conditioned, so 10 steps shrink the gradient only a little). The default check
    (relative to ||grad f(w_0)||, small after a warm start) fires on every step although the
    warm-started hypergradients are soon within 1% of the dense ones; relative to a cold start's
    gradient norm it fires exactly on the steps whose hypergradient is more than 1% off."""
    gen = torch.Generator().manual_seed(0)
    columns = torch.tensor([1.0, 1.0, 0.5, 0.3, 0.2], dtype=torch.float64)
    X = torch.randn(40, 5, generator=gen, dtype=torch.float64) * columns
    y = X @ torch.randn(5, generator=gen, dtype=torch.float64)
    y = y + 0.3 * torch.randn(40, generator=gen, dtype=torch.float64)
    Xv = torch.randn(40, 5, generator=gen, dtype=torch.float64) * columns
    yv = Xv @ torch.randn(5, generator=gen, dtype=torch.float64)

    def inner(p, log_lam, data):
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * log_lam.exp() * (p["w"] ** 2).sum()

    def exact(log_lam):  # dense: w*(lam) and the validation loss through it
        H = X.T @ X / 40 + log_lam.exp() * torch.eye(5, dtype=torch.float64)
        w = torch.linalg.solve(H, X.T @ y / 40)
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    def outer_steps(mode, n=8):
        log_lam = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
        w = {"w": torch.zeros(5, dtype=torch.float64)}
        errors, fired = [], []
        for _ in range(n):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                params = bl.solve(inner, w, log_lam, optimizer=bl.sgd(0.5), steps=10, mode=mode)
            fired.append(any(issubclass(c.category, bl.BilevelWarning) for c in caught))
            (g,) = torch.autograd.grad(0.5 * ((Xv @ params["w"] - yv) ** 2).mean(), log_lam)
            (g_exact,) = torch.autograd.grad(exact(log_lam), log_lam)
            errors.append(float((g - g_exact).abs() / g_exact.abs()))
            w = {"w": params["w"].detach()}  # warm start
            with torch.no_grad():
                log_lam -= 0.1 * g
        return fired, errors

    cold = float(torch.linalg.vector_norm(X.T @ y / 40))  # ||grad f(0)||, a cold start
    fired, errors = outer_steps(bl.Implicit(bl.CG(tol=1e-12)))
    assert errors[0] > 0.1 and max(errors[2:]) < 0.01
    assert all(fired)  # a false alarm on every warm-started step
    scaled = bl.Implicit(bl.CG(tol=1e-12), stationarity_rtol=1e-2, stationarity_scale=cold)
    fired, errors = outer_steps(scaled)
    assert errors[0] > 0.1 and max(errors[2:]) < 0.01
    assert fired == [e > 0.01 for e in errors]  # fires exactly where the error exceeds 1%
    assert fired[:3] == [True, True, False]
