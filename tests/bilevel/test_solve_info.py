"""`bl.solve_with_info`: the diagnostics as one typed record (`bl.SolveInfo`, tensors only), from
closed forms; no host read with `check_finite=False`; the deprecated `return_info` /
`NonFiniteReport` route gives the same numbers over it."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from benchmarks.count_host_syncs import count_syncs

LR, K = 0.3, 4


def _quadratic(a):
    """f(w) = 0.5 ||w - a||^2: SGD(lr) gives w_k - a = (1 - lr)^k (w_0 - a)."""
    return lambda params, meta, data: 0.5 * (params["w"] - a).square().sum()


def _problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, generator=g, dtype=torch.float64)
    w0 = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    return a, w0


@pytest.mark.parametrize("mode", [bl.Unrolled(), bl.Truncated(2), bl.FirstOrder()])
def test_the_record_is_the_closed_form_of_sgd_on_a_quadratic(mode):
    a, w0 = _problem()
    params, info = bl.solve_with_info(
        _quadratic(a), w0, optimizer=bl.sgd(LR), steps=K, mode=mode, final_grad_norm=True
    )
    assert isinstance(info, bl.SolveInfo)
    r0 = (w0["w"] - a).norm()
    decay = torch.tensor([(1 - LR) ** k for k in range(K)], dtype=torch.float64)
    torch.testing.assert_close(info.loss, 0.5 * (decay * r0) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(info.grad_norm, decay * r0, rtol=1e-12, atol=0)
    torch.testing.assert_close(info.grad_norms["w"], decay * r0, rtol=1e-12, atol=0)
    torch.testing.assert_close(info.final_grad_norm, (1 - LR) ** K * r0, rtol=1e-12, atol=0)
    assert info.nonfinite.dtype == torch.bool and not info.nonfinite
    assert info.stationary is None and info.linsolve == {}
    torch.testing.assert_close(params["w"], a + (1 - LR) ** K * (w0["w"] - a), rtol=1e-12, atol=0)
    # the plain contract: params_K alone, the same values
    alone = bl.solve(_quadratic(a), w0, optimizer=bl.sgd(LR), steps=K, mode=mode)
    assert isinstance(alone, dict) and torch.equal(alone["w"], params["w"])


def _nan_at_step_2(params, meta, data):
    loss = 0.5 * params["w"].square().sum()
    return loss * data  # data: the per-step factor; nan at step 2


NAN_DATA = bl.PerStep([1.0, 1.0, float("nan"), 1.0])


def test_a_nonfinite_loss_is_a_tensor_flag_without_a_host_read():
    w0 = {"w": torch.ones(3)}

    def call():
        return bl.solve_with_info(
            _nan_at_step_2, w0, optimizer=bl.sgd(0.1), steps=4, mode=bl.FirstOrder(),
            data=NAN_DATA, check_finite=False,
        )  # fmt: skip

    report = count_syncs(call)
    assert report.per_step() == [0], report.by_site()
    _, info = call()
    assert info.nonfinite.dim() == 0 and bool(info.nonfinite)
    assert torch.isfinite(info.loss).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="inner_loss returned nan at step 2"):
        bl.solve_with_info(
            _nan_at_step_2, w0, optimizer=bl.sgd(0.1), steps=4, data=NAN_DATA
        )  # the default policy raises: one host read
    a, w0 = _problem()
    plain = count_syncs(
        lambda: bl.solve(_quadratic(a), w0, optimizer=bl.sgd(LR), steps=K, check_finite=False)
    )
    assert plain.per_step() == [0], plain.by_site()


def test_the_flag_is_per_task_under_vmap():
    w0 = {"w": torch.ones(3, 2)}
    factors = torch.tensor([1.0, float("inf"), 1.0])

    def one(w, factor):
        loss = lambda p, m, d: 0.5 * p["w"].square().sum() * d  # noqa: E731
        _, info = bl.solve_with_info(
            loss, {"w": w}, optimizer=bl.sgd(0.1), steps=2, data=factor, check_finite=False
        )
        return info.nonfinite

    flags = torch.func.vmap(one)(w0["w"], factors)
    assert flags.tolist() == [False, True, False]


def test_the_deprecated_route_gives_the_same_numbers_and_a_lazy_report():
    a, w0 = _problem()
    kwargs = dict(optimizer=bl.sgd(LR), steps=K, mode=bl.FirstOrder())
    _, info = bl.solve_with_info(_quadratic(a), w0, final_grad_norm=True, **kwargs)
    _, old = bl.solve(_quadratic(a), w0, return_info=True, final_grad_norm=True, **kwargs)
    assert set(old) == {"loss", "grad_norm", "grad_norms", "final_grad_norm"}
    for name in ("loss", "grad_norm", "final_grad_norm"):
        assert torch.equal(old[name], getattr(info, name))
    assert torch.equal(old["grad_norms"]["w"], info.grad_norms["w"])

    w1 = {"w": torch.ones(3)}
    report = bl.NonFiniteReport()
    call = lambda: bl.solve(  # noqa: E731
        _nan_at_step_2, w1, optimizer=bl.sgd(0.1), steps=4, data=NAN_DATA, nonfinite=report,
        return_info=True,
    )  # fmt: skip
    assert count_syncs(call).per_step() == [0]  # solve reads nothing; the report, when read
    assert report.checked and report.found and report.step == 2 and math.isnan(report.value)
    bl.solve(_quadratic(a), w0, nonfinite=report, **kwargs)
    assert report.checked and not report.found and report.step is None and report.value is None


def test_implicit_mode_fills_the_linear_solve_record_after_the_backward():
    a, w0 = _problem()
    meta = a.clone().requires_grad_()
    inner = lambda p, m, d: 0.5 * (p["w"] - m).square().sum()  # noqa: E731
    params, info = bl.solve_with_info(
        inner, w0, meta, optimizer=bl.sgd(0.9), steps=30,
        mode=bl.Implicit(linsolve=bl.CG(maxiter=5, tol=1e-12)),
    )  # fmt: skip
    assert bool(info.stationary) and info.linsolve == {}
    (d_meta,) = torch.autograd.grad(params["w"].sum(), meta)
    torch.testing.assert_close(d_meta, torch.ones_like(a), rtol=1e-10, atol=1e-10)  # dw*/da = I
    assert set(info.linsolve) >= {"iterations", "residual", "converged"}
    assert float(info.linsolve["residual"]) < 1e-8
    _, old = bl.solve(
        inner, w0, meta, optimizer=bl.sgd(0.9), steps=30, return_info=True,
        mode=bl.Implicit(linsolve=bl.CG(maxiter=5, tol=1e-12)),
    )  # fmt: skip
    assert "linsolve_residual" not in old and {"final_grad_norm", "stationary"} <= set(old)
