"""solve(): boundary errors, diagnostics, per-step data, closures, hooks, first-order cost,
warnings, and composition with vmap / torch.func.grad / torch.compile."""

from __future__ import annotations

import math
import warnings
import weakref

import pytest
import torch
from torch import nn

import bilevel as bl


def _quadratic(p, meta, data):
    target = 0.0 if data is None else data
    scale = 1.0 if meta is None else meta
    return 0.5 * scale * ((p["w"] - target) ** 2).sum()


def _w0():
    return {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(steps=0), ValueError, "steps must be >= 1, got 0"),
        (dict(steps=2.0), TypeError, "steps must be an int"),
        (
            dict(steps=3, mode=bl.Truncated(4)),
            ValueError,
            "Truncated T must be <= steps, got T=4 with steps=3",
        ),
        (dict(steps=3, mode="unrolled"), TypeError, "mode must be bl.Unrolled"),
        (
            dict(steps=3, optimizer=torch.optim.SGD),
            TypeError,
            "optimizer must be a GradientTransformation",
        ),
        (
            dict(steps=3, data=bl.PerStep([1.0, 2.0])),
            ValueError,
            "PerStep data has 2 entries but steps=3",
        ),
        (
            dict(steps=3, final_grad_norm=True),
            ValueError,
            "final_grad_norm=True only has an effect",
        ),
        (dict(steps=3, nonfinite="ignore"), TypeError, "nonfinite must be None .* got str"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    kwargs = {"optimizer": bl.sgd(0.1), **kwargs}
    with pytest.raises(error, match=match):
        bl.solve(_quadratic, _w0(), None, **kwargs)


def test_bad_params_meta_and_losses_raise_clear_errors():
    opt = dict(optimizer=bl.sgd(0.1), steps=2)
    with pytest.raises(TypeError, match=r"params0 must be a dict\[str, Tensor\], got Tensor"):
        bl.solve(_quadratic, torch.zeros(3), None, **opt)
    with pytest.raises(ValueError, match="params0 must hold at least one tensor"):
        bl.solve(_quadratic, {}, None, **opt)
    with pytest.raises(TypeError, match=r"params0\['w'\] must be a Tensor, got list"):
        bl.solve(_quadratic, {"w": [1.0]}, None, **opt)
    with pytest.raises(TypeError, match="meta must be None, a Tensor or a dict"):
        bl.solve(_quadratic, _w0(), 2.0, **opt)
    with pytest.raises(TypeError, match="meta must be None, a Tensor or a dict.*got list"):
        bl.solve(_quadratic, _w0(), [torch.ones(())], **opt)  # only an *empty* list means none
    with pytest.raises(TypeError, match=r"meta\['b'\] must be a Tensor, got dict"):
        bl.solve(_quadratic, _w0(), {"a": torch.ones(()), "b": {}}, **opt)
    with pytest.raises(ValueError, match=r"scalar \(0-d\) Tensor, got shape \(3,\) at step 0"):
        bl.solve(lambda p, m, d: p["w"] ** 2, _w0(), None, **opt)
    with pytest.raises(TypeError, match="inner_loss must return a Tensor, got float"):
        bl.solve(lambda p, m, d: 1.0, _w0(), None, **opt)


@pytest.mark.parametrize("mode", [bl.Unrolled(), bl.FirstOrder(), bl.Truncated(1), bl.Implicit()])
def test_non_finite_loss_names_the_step(mode):
    """The iterate overflows after the first step, so the loss is -inf at step 1, in every mode."""

    def loss(p, meta, data):
        return -torch.exp(p["w"]).sum()

    w0 = {"w": torch.tensor([700.0], dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"inner_loss returned -inf at step 1; expected a finite"):
        bl.solve(loss, w0, None, optimizer=bl.sgd(1.0), steps=3, mode=mode)


_ALL_MODES = [bl.Unrolled(), bl.Truncated(2), bl.FirstOrder(), bl.Implicit(bl.CG(tol=1e-12))]
_MODE_IDS = ["unrolled", "truncated", "first_order", "implicit"]


def _nan_at(step: int, steps: int = 4) -> bl.PerStep:
    """Per-step targets for ``_quadratic``: zero, except a nan entry at ``step``."""
    targets = [torch.zeros(3, dtype=torch.float64) for _ in range(steps)]
    targets[step] = torch.tensor([0.0, math.nan, 0.0], dtype=torch.float64)
    return bl.PerStep(targets)


@pytest.mark.parametrize("mode", _ALL_MODES, ids=_MODE_IDS)
@pytest.mark.parametrize("bad_step", [0, 2])
def test_a_nonfinite_report_replaces_the_error_and_names_the_first_bad_step(mode, bad_step):
    """A nan target at ``bad_step`` makes that loss nan and every later one (the iterate is nan
    from then on): the default raises naming ``bad_step``; a report records it instead."""
    scale = torch.tensor(1.0, dtype=torch.float64)  # no grad: FirstOrder does not warn
    kwargs = dict(optimizer=bl.sgd(0.5), steps=4, mode=mode, data=_nan_at(bad_step))
    with pytest.raises(ValueError, match=rf"inner_loss returned nan at step {bad_step}; expected"):
        bl.solve(_quadratic, _w0(), scale, **kwargs)
    report = bl.NonFiniteReport()
    params, info = bl.solve(_quadratic, _w0(), scale, return_info=True, nonfinite=report, **kwargs)
    assert report.checked and report.found and report.step == bad_step
    assert math.isnan(report.value)
    assert torch.isfinite(info["loss"]).tolist() == [k < bad_step for k in range(4)]
    assert torch.isnan(params["w"]).any()  # the non-finite value propagated to the caller


def test_a_nonfinite_report_records_an_overflow_to_minus_inf():
    report = bl.NonFiniteReport()
    w0 = {"w": torch.tensor([700.0], dtype=torch.float64)}
    params = bl.solve(
        lambda p, m, d: -torch.exp(p["w"]).sum(),
        w0,
        None,
        optimizer=bl.sgd(1.0),
        steps=3,
        nonfinite=report,
    )
    assert (report.checked, report.step, report.value) == (True, 1, -math.inf)
    assert params["w"].item() == math.inf
    assert repr(report) == "NonFiniteReport(checked=True, step=1, value=-inf)"


@pytest.mark.filterwarnings("ignore::bilevel.BilevelWarning")  # FirstOrder: meta gets nothing
@pytest.mark.parametrize("mode", _ALL_MODES, ids=_MODE_IDS)
def test_a_nonfinite_report_leaves_finite_runs_bit_identical(mode):
    """Same iterate, info and outer gradients to the last bit; a reused report is reset."""
    target = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)

    def loss(p, m, d):
        return _quadratic(p, m, d) + 0.05 * (p["w"] ** 4).sum()

    report = bl.NonFiniteReport()
    kwargs = dict(optimizer=bl.sgd(0.5), steps=4, data=_nan_at(1), nonfinite=report)
    bl.solve(_quadratic, _w0(), None, **kwargs)
    assert report.step == 1  # stale, from the previous solve

    def run(nonfinite):
        w0 = _w0()["w"].requires_grad_()
        meta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        params, info = bl.solve(
            loss,
            {"w": w0},
            meta,
            optimizer=bl.adam(0.1),
            steps=30,
            mode=mode,
            data=target,
            return_info=True,
            nonfinite=nonfinite,
        )
        outer = ((params["w"] - 1.0) ** 2).sum()
        return params["w"], info, torch.autograd.grad(outer, [w0, meta], allow_unused=True)

    (w_a, info_a, grads_a), (w_b, info_b, grads_b) = run(None), run(report)
    assert torch.equal(w_a, w_b)
    for key in ("loss", "grad_norm"):
        assert torch.equal(info_a[key], info_b[key])
    assert any(g is not None for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        assert (a is None and b is None) or torch.equal(a, b)
    assert report.checked and not report.found and report.step is None and report.value is None


def test_under_vmap_a_report_stays_unchecked_and_info_loss_carries_the_signal():
    """Values cannot steer Python under vmap: neither policy looks at them, nothing raises."""
    targets = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets[1, 0] = math.nan
    report = bl.NonFiniteReport()

    def task(target, nonfinite):
        params, info = bl.solve(
            _quadratic,
            _w0(),
            None,
            optimizer=bl.sgd(0.5),
            steps=3,
            data=target,
            return_info=True,
            nonfinite=nonfinite,
        )
        return params["w"], info["loss"]

    for nonfinite in (None, report):
        w, losses = torch.func.vmap(task, in_dims=(0, None))(targets, nonfinite)
        assert torch.isfinite(losses).all(dim=1).tolist() == [True, False, True]
        torch.testing.assert_close(w[2], task(targets[2], None)[0], rtol=1e-12, atol=1e-14)
    assert not report.checked and not report.found


@pytest.mark.slow
def test_under_torch_compile_a_report_stays_unchecked():
    report = bl.NonFiniteReport()

    def adapt(w0, target):
        kwargs = dict(optimizer=bl.sgd(0.5), steps=2, data=target, nonfinite=report)
        return bl.solve(_quadratic, {"w": w0}, None, **kwargs)["w"]

    compiled = torch.compile(adapt, backend="aot_eager", fullgraph=True)
    w = compiled(torch.zeros(3), torch.tensor([math.nan, 1.0, 1.0]))
    assert torch.isnan(w[0]) and torch.equal(w[1:], torch.full((2,), 0.75))
    assert not report.checked and not report.found


# --- meta: an empty container means no outer variables ------------------------------------


def _record_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("mode", _ALL_MODES, ids=_MODE_IDS)
@pytest.mark.parametrize("empty", [{}, (), [], {"a": (), "b": {}}, (None,)], ids=repr)
def test_an_empty_meta_is_no_outer_variables_exactly_like_none(mode, empty):
    """MAML's shape: the outer variable is params0. f = 1/2 sum c w^2 with SGD(lr) gives
    w_K = (1 - lr c)^K w_0, so for L = v . w_K: dL/dw_0 = v (1 - lr c)^K (Unrolled),
    v (FirstOrder, straight-through), none (Truncated with T < K, Implicit)."""
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    v = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    lr, K = 0.1, 3
    seen = []

    def loss(p, meta, data):
        seen.append(meta)
        return 0.5 * (c * p["w"] ** 2).sum()

    def run(meta):
        w0 = _w0()["w"].requires_grad_()
        w = bl.solve(loss, {"w": w0}, meta, optimizer=bl.sgd(lr), steps=K, mode=mode)["w"]
        if not w.requires_grad:
            return w, None
        (g,) = torch.autograd.grad((v * w).sum(), w0, allow_unused=True)
        return w, g

    (w_none, g_none), warned_none = _record_warnings(lambda: run(None))
    seen.clear()
    (w_empty, g_empty), warned_empty = _record_warnings(lambda: run(empty))
    assert seen and all(m is empty for m in seen)  # inner_loss receives meta as given
    assert warned_empty == warned_none  # Implicit: the same "no outer variables" warning
    if isinstance(mode, bl.Implicit):
        assert any("no outer variables" in message for _, message in warned_empty)
    assert torch.equal(w_empty, w_none)
    torch.testing.assert_close(w_empty.detach(), (1 - lr * c) ** K * _w0()["w"])
    expected = {
        bl.Unrolled: v * (1 - lr * c) ** K,
        bl.FirstOrder: v,
        bl.Truncated: None,
        bl.Implicit: None,
    }[type(mode)]
    if expected is None:
        assert g_none is None and g_empty is None
    else:
        assert torch.equal(g_empty, g_none)
        torch.testing.assert_close(g_empty, expected, rtol=1e-14, atol=0)


@pytest.mark.filterwarnings("ignore::bilevel.BilevelWarning")  # Implicit: nothing to receive
@pytest.mark.parametrize("mode", _ALL_MODES, ids=_MODE_IDS)
def test_an_empty_meta_under_vmap_and_func_grad_matches_none(mode):
    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w0 = torch.randn(3, generator=gen, dtype=torch.float64)

    def task(w_init, target, meta):
        params = bl.solve(
            lambda p, m, d: 0.5 * ((p["w"] - d) ** 2).sum() + 0.1 * (p["w"] ** 4).sum(),
            {"w": w_init},
            meta,
            optimizer=bl.sgd(0.3, momentum=0.5),
            steps=4,
            mode=mode,
            data=target,
        )
        return ((params["w"] - 1.0) ** 2).sum()

    per_task = torch.func.vmap(torch.func.grad_and_value(task), in_dims=(None, 0, None))
    reference = per_task(w0, targets, None)
    for empty in ({}, (), []):
        for got, want in zip(per_task(w0, targets, empty), reference):
            assert torch.equal(got, want)
    grads = reference[0]
    if isinstance(mode, (bl.Unrolled, bl.FirstOrder)):
        assert grads.abs().min() > 0  # a real gradient reaches params0, not a zero placeholder


# --- diagnostics ---------------------------------------------------------------------------


def test_info_records_loss_and_gradient_norms_without_extra_evaluations():
    calls = []

    def counted(p, meta, data):
        calls.append(1)
        return _quadratic(p, meta, data) + (p["b"] ** 4).sum()

    w0 = {
        "w": torch.tensor([1.0, -2.0], dtype=torch.float64),
        "b": torch.tensor(0.5, dtype=torch.float64),
    }
    lr, K = 0.1, 3
    params, info = bl.solve(counted, w0, None, optimizer=bl.sgd(lr), steps=K, return_info=True)
    assert len(calls) == K and set(info) == {"loss", "grad_norm", "grad_norms"}
    # replay the loop by hand: loss and gradient at the iterate each gradient is taken at
    w, b = w0["w"].clone(), w0["b"].clone()
    for k in range(K):
        g_w, g_b = w, 4 * b**3
        torch.testing.assert_close(info["loss"][k], 0.5 * (w**2).sum() + b**4)
        torch.testing.assert_close(info["grad_norms"]["w"][k], torch.linalg.vector_norm(g_w))
        torch.testing.assert_close(info["grad_norms"]["b"][k], g_b.abs())
        torch.testing.assert_close(info["grad_norm"][k], torch.sqrt((g_w**2).sum() + g_b**2))
        w, b = w - lr * g_w, b - lr * g_b
    assert info["loss"].shape == (K,) and info["loss"].grad_fn is None
    calls.clear()
    _, info = bl.solve(
        counted, w0, None, optimizer=bl.sgd(lr), steps=K, return_info=True, final_grad_norm=True
    )
    assert len(calls) == K + 1  # the opt-in costs exactly one evaluation
    torch.testing.assert_close(info["final_grad_norm"], torch.sqrt((w**2).sum() + (4 * b**3) ** 2))


def test_implicit_info_reports_the_linear_solve_after_backward():
    meta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    params, info = bl.solve(
        lambda p, m, d: 0.5 * m * ((p["w"] - 1.0) ** 2).sum() + 0.1 * (p["w"] ** 2).sum(),
        _w0(),
        meta,
        optimizer=bl.sgd(0.3),
        steps=60,
        mode=bl.Implicit(bl.CG(tol=1e-12)),
        return_info=True,
    )
    assert float(info["final_grad_norm"]) < 1e-10
    assert "linsolve_iterations" not in info  # nothing solved yet: the solve runs in backward
    params["w"].sum().backward()
    assert int(info["linsolve_iterations"]) >= 1 and bool(info["linsolve_converged"]) is True
    assert float(info["linsolve_residual"]) <= 1e-12


# --- per-step data, closures, modules with hooks ----------------------------------------


def test_per_step_data_feeds_one_batch_per_step():
    targets = [torch.full((3,), float(i), dtype=torch.float64) for i in range(4)]
    lr = 0.25
    meta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    params, info = bl.solve(
        _quadratic,
        _w0(),
        meta,
        optimizer=bl.sgd(lr),
        steps=4,
        data=bl.PerStep(targets),
        return_info=True,
    )
    w, expected_losses = _w0()["w"], []
    for target in targets:  # by hand, differentiably
        expected_losses.append(0.5 * meta * ((w - target) ** 2).sum())
        w = w - lr * meta * (w - target)
    torch.testing.assert_close(params["w"], w)
    torch.testing.assert_close(info["loss"], torch.stack(expected_losses).detach())
    (got,) = torch.autograd.grad(params["w"].sum(), meta, retain_graph=True)
    (expected,) = torch.autograd.grad(w.sum(), meta)
    torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="PerStep needs a sequence"):
        bl.PerStep(iter(targets))


def test_meta_none_with_a_closed_over_outer_variable():
    """MemDLM's shape: the inner loss closes over the outer variables; Unrolled differentiates
    through the loop to them, FirstOrder gives them no gradient through the loop."""
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def loss(p, meta, data):
        assert meta is None
        return 0.5 * scale * ((p["w"] - 1.0) ** 2).sum()

    w = bl.solve(loss, _w0(), None, optimizer=bl.sgd(0.5), steps=3)["w"]
    (got,) = torch.autograd.grad(w.sum(), scale)
    # w_K = 1 + (1 - 0.5 s)^3 (w_0 - 1): d/ds = -1.5 (1 - 0.5 s)^2 (w_0 - 1)
    expected = (-1.5 * (1 - 0.4) ** 2 * (_w0()["w"] - 1.0)).sum()
    torch.testing.assert_close(got, expected)
    w = bl.solve(loss, _w0(), None, optimizer=bl.sgd(0.5), steps=3, mode=bl.FirstOrder())["w"]
    assert w.grad_fn is None and not w.requires_grad


class _Hooked(nn.Module):
    """A linear model whose fast weight ``delta`` is read by a forward hook (like memory.bind)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.delta = None
        self.lin.register_forward_hook(self._add_fast_weight)

    def _add_fast_weight(self, module, inputs, out):
        return out if self.delta is None else out + inputs[0] @ self.delta.T

    def loss(self, params, meta, data):
        x, y = data
        self.delta = params["delta"]
        try:
            return ((self(x) - y) ** 2).mean()
        finally:
            self.delta = None

    def forward(self, x):
        return self.lin(x)


def _functional_loss(model, params, data):
    x, y = data
    out = torch.func.functional_call(model.lin, dict(model.lin.named_parameters()), (x,))
    return ((out + x @ params["delta"].T - y) ** 2).mean()


def test_modules_reading_params_through_hooks_or_functional_call():
    torch.manual_seed(1)
    model = _Hooked()
    xs, ys = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    delta0 = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)

    def hypergrad(loss, x, y):
        params = bl.solve(
            loss, {"delta": delta0}, None, optimizer=bl.sgd(0.3), steps=3, data=(x, y)
        )
        return torch.autograd.grad(loss(params, None, (x, y)), [delta0, model.lin.weight])

    hooked = hypergrad(model.loss, xs[0], ys[0])
    functional = hypergrad(lambda p, m, d: _functional_loss(model, p, d), xs[0], ys[0])
    for a, b in zip(hooked, functional):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    def task(x, y):  # under vmap the hook sees batched tensors
        params = bl.solve(
            model.loss, {"delta": delta0}, None, optimizer=bl.sgd(0.3), steps=3, data=(x, y)
        )
        return model.loss(params, None, (x, y))

    losses = torch.func.vmap(task)(xs, ys)
    looped = torch.stack([task(x, y) for x, y in zip(xs, ys)])
    torch.testing.assert_close(losses, looped, rtol=1e-12, atol=1e-14)


# --- first-order mode keeps no graph ---------------------------------------------------------


class _SavedTensorTracker:
    """Counts tensors saved for backward that are still referenced by a live autograd graph.

    Each saved tensor is packed into a handle whose lifetime is that of the graph node holding
    it. The handle keeps a *detached* alias: holding the tensor itself would, for saved
    outputs, form a node -> handle -> tensor -> node cycle that never dies.
    """

    class _Handle:
        def __init__(self, tensor):
            self.tensor = tensor.detach()

    def __init__(self):
        self.handles = weakref.WeakSet()

    def pack(self, tensor):
        handle = self._Handle(tensor)
        self.handles.add(handle)
        return handle

    def live(self) -> int:
        return len(self.handles)  # refcounting frees a graph at once: no gc.collect needed


@pytest.mark.parametrize("steps", [1, 8])
def test_first_order_keeps_no_graph_to_closed_over_tensors_or_between_steps(steps):
    W = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)  # an outer weight, closed over
    x = torch.randn(10, 6, dtype=torch.float64)
    tracker = _SavedTensorTracker()
    live_at_each_step = []

    def loss(p, meta, data):
        live_at_each_step.append(tracker.live())
        return (torch.tanh(x @ W) @ p["v"]).square().mean()

    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda handle: handle.tensor):
        out = bl.solve(
            loss,
            {"v": torch.randn(6, dtype=torch.float64)},
            None,
            optimizer=bl.chain(bl.clip_per_tensor(1.0), bl.sgd(0.1)),
            steps=steps,
            mode=bl.FirstOrder(),
        )
    assert out["v"].grad_fn is None and not out["v"].requires_grad
    assert live_at_each_step == [0] * steps  # nothing survives from one step to the next
    assert tracker.live() == 0

    # the same loop unrolled keeps a graph that grows with the number of steps (sanity check)
    live_at_each_step.clear()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda handle: handle.tensor):
        out = bl.solve(
            loss,
            {"v": torch.randn(6, dtype=torch.float64)},
            None,
            optimizer=bl.sgd(0.1),
            steps=steps,
        )
    assert out["v"].grad_fn is not None and tracker.live() > 0
    if steps > 1:
        assert live_at_each_step[-1] > live_at_each_step[1] > 0


def test_first_order_params0_gets_the_identity_jacobian():
    w0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = bl.solve(
        lambda p, m, d: (p["w"] ** 4).sum(),
        {"w": w0},
        None,
        optimizer=bl.sgd(0.01),
        steps=4,
        mode=bl.FirstOrder(),
    )
    v = torch.randn(3, dtype=torch.float64)
    (g,) = torch.autograd.grad((out["w"] * v).sum(), w0)
    torch.testing.assert_close(g, v, rtol=0, atol=0)


# --- warnings --------------------------------------------------------------------------------


def test_implicit_warns_when_far_from_stationary_or_when_the_solve_hits_maxiter():
    meta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def loss(p, m, d):
        return 0.5 * m * ((p["w"] - 1.0) ** 2).sum()

    with pytest.warns(bl.BilevelWarning, match="assumes params_K is stationary"):
        bl.solve(loss, _w0(), meta, optimizer=bl.sgd(0.1), steps=2, mode=bl.Implicit())
    with pytest.warns(bl.BilevelWarning, match="nothing can receive an implicit gradient"):
        bl.solve(
            lambda p, m, d: loss(p, meta, d),
            _w0(),
            None,
            optimizer=bl.sgd(1.0),
            steps=2,
            mode=bl.Implicit(),
        )

    def coupled(p, m, d):  # an ill-conditioned Hessian: CG needs more than one iteration
        w = p["w"]
        return 0.5 * (w[0] ** 2 + 100 * w[1] ** 2 + 1e4 * w[2] ** 2) - m * w.sum()

    w_star = {"w": torch.tensor([1.0, 1e-2, 1e-4], dtype=torch.float64)}
    out = bl.solve(
        coupled,
        w_star,
        meta,
        optimizer=bl.sgd(1e-5),
        steps=1,
        mode=bl.Implicit(bl.CG(maxiter=1, tol=1e-12)),
    )
    with pytest.warns(bl.BilevelWarning, match="CG hit maxiter=1"):
        out["w"].sum().backward()


# --- composition with torch.func and torch.compile ------------------------------------------


@pytest.mark.filterwarnings("ignore::bilevel.BilevelWarning")  # FirstOrder: meta gets nothing
@pytest.mark.parametrize(
    "mode",
    [bl.Unrolled(), bl.Truncated(2), bl.FirstOrder(), bl.Implicit(bl.CG(tol=1e-12))],
    ids=["unrolled", "truncated", "first_order", "implicit"],
)
def test_vmap_over_tasks_equals_a_loop_and_func_grad_equals_autograd(mode):
    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    scales = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    w0 = torch.randn(3, generator=gen, dtype=torch.float64)
    steps = 40 if isinstance(mode, bl.Implicit) else 5

    def task(w_init, scale, target):
        optimizer = bl.sgd(0.4, momentum=0.3)
        params = bl.solve(
            _quadratic,
            {"w": w_init},
            scale,
            optimizer=optimizer,
            steps=steps,
            mode=mode,
            data=target,
        )
        return ((params["w"] - 2.0) ** 2).sum() + scale**2

    meta_grad = torch.func.grad(task, argnums=(0, 1))
    batched = torch.func.vmap(meta_grad, in_dims=(None, 0, 0))(w0, scales, targets)
    for i in range(4):
        looped = meta_grad(w0, scales[i], targets[i])
        w_leaf, s_leaf = w0.clone().requires_grad_(), scales[i].clone().requires_grad_()
        by_autograd = torch.autograd.grad(
            task(w_leaf, s_leaf, targets[i]), [w_leaf, s_leaf], allow_unused=True
        )
        for b, l, a in zip(batched, looped, by_autograd):
            torch.testing.assert_close(b[i], l, rtol=1e-11, atol=1e-13)
            torch.testing.assert_close(
                l, torch.zeros_like(l) if a is None else a, rtol=1e-11, atol=1e-13
            )


@pytest.mark.slow
def test_torch_compile_of_an_unrolled_hypergradient():
    """fullgraph capture of torch.func.grad over solve (aot_eager keeps CI fast; inductor was
    checked by hand, see docs/bilevel.md)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    A = A @ A.T + 4 * torch.eye(4, dtype=torch.float64)
    w0 = {"w": torch.randn(4, generator=gen, dtype=torch.float64)}

    def hyper(theta):
        def inner(p, th, data):
            return 0.5 * p["w"] @ A @ p["w"] - p["w"] @ th

        optimizer = bl.chain(bl.clip_by_global_norm(10.0), bl.sgd(0.05, momentum=0.9))
        return ((bl.solve(inner, w0, theta, optimizer=optimizer, steps=3)["w"] - 1.0) ** 2).sum()

    theta = torch.randn(4, generator=gen, dtype=torch.float64)
    compiled = torch.compile(torch.func.grad(hyper), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(theta), torch.func.grad(hyper)(theta), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize(
    "mode", [bl.Unrolled(), bl.FirstOrder(), bl.Implicit()], ids=["unrolled", "fo", "implicit"]
)
def test_info_under_vmap_is_batched_per_task(mode):
    targets = torch.randn(3, 3, dtype=torch.float64)
    scale = torch.tensor(1.0, dtype=torch.float64)

    def task(target):
        _, info = bl.solve(
            _quadratic,
            _w0(),
            scale,
            optimizer=bl.sgd(0.5),
            steps=25,
            mode=mode,
            data=target,
            return_info=True,
            final_grad_norm=not isinstance(mode, bl.Implicit),
        )
        return info

    batched = torch.func.vmap(task)(targets)
    assert batched["loss"].shape == (3, 25) and batched["final_grad_norm"].shape == (3,)
    for i in range(3):
        single = task(targets[i])
        for key in ("loss", "grad_norm", "final_grad_norm"):
            torch.testing.assert_close(batched[key][i], single[key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(batched["grad_norms"]["w"][i], single["grad_norms"]["w"])
