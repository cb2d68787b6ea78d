"""Optimizers against torch.optim step for step (float64), gradchecks of single steps, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import bilevel as bl

STEPS = 5


def _params_and_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "s": torch.randn((), generator=gen, dtype=torch.float64),
    }
    grads = []
    for _ in range(STEPS):
        g = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
        g["w"][0, 0] = 0.0  # an exactly-zero entry: exercises safe_sqrt's forward
        grads.append(g)
    return params, grads


def _sgd_cases():
    for momentum, nesterov, wd in itertools.product((0.0, 0.9), (False, True), (0.0, 0.05)):
        if nesterov and momentum == 0:
            continue
        kw = dict(lr=0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov)
        yield (
            f"sgd-{momentum}-{nesterov}-{wd}",
            bl.sgd(**kw),
            lambda p, kw=kw: torch.optim.SGD(p, **kw),
        )


def _adam_cases():
    for (factory, reference), betas, eps, wd in itertools.product(
        ((bl.adam, torch.optim.Adam), (bl.adamw, torch.optim.AdamW)),
        ((0.9, 0.999), (0.5, 0.9)),
        (1e-8, 1e-3),
        (0.0, 0.1),
    ):
        kw = dict(lr=0.01, betas=betas, eps=eps, weight_decay=wd)
        name = f"{factory.__name__}-{betas}-{eps}-{wd}"
        yield name, factory(**kw), lambda p, kw=kw, ref=reference: ref(p, **kw)


def _rmsprop_cases():
    for alpha, centered, momentum, wd in itertools.product(
        (0.99, 0.5), (False, True), (0.0, 0.9), (0.0, 0.1)
    ):
        kw = dict(
            lr=0.01, alpha=alpha, eps=1e-8, weight_decay=wd, momentum=momentum, centered=centered
        )
        yield (
            f"rmsprop-{alpha}-{centered}-{momentum}-{wd}",
            bl.rmsprop(**kw),
            lambda p, kw=kw: torch.optim.RMSprop(p, **kw),
        )


CASES = [*_sgd_cases(), *_adam_cases(), *_rmsprop_cases()]


@pytest.mark.parametrize("name,optimizer,reference", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_optim_step_for_step(name, optimizer, reference):
    params, grads = _params_and_grads()
    leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
    torch_opt = reference(list(leaves.values()))
    state = optimizer.init(params)
    for step, g in enumerate(grads):
        updates, state = optimizer.update(g, state, params)
        params = bl.apply_updates(params, updates)
        for k, leaf in leaves.items():
            leaf.grad = g[k].clone()
        torch_opt.step()
        for k, leaf in leaves.items():
            torch.testing.assert_close(
                params[k], leaf.detach(), rtol=1e-13, atol=1e-15, msg=f"{name} step {step} {k}"
            )


def _warm_state(optimizer, warmup: int):
    """Params, the next grads and the state after `warmup` steps, so that second moments are
    positive (gradcheck away from sqrt's kink at 0)."""
    params, grads = _params_and_grads(seed=1)
    state = optimizer.init(params)
    for g in grads[:warmup]:
        updates, state = optimizer.update(g, state, params)
        params = bl.apply_updates(params, updates)
    return params, grads[warmup], state


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: bl.sgd(lr, momentum=0.9, weight_decay=0.1, nesterov=True),
        lambda lr: bl.adam(lr, weight_decay=0.1),
        lambda lr: bl.adamw(lr, weight_decay=0.1),
        lambda lr: bl.rmsprop(lr, momentum=0.5, centered=True, weight_decay=0.1),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop"],
)
def test_single_step_gradcheck(make):
    """gradcheck of one step w.r.t. params, grads, optimizer state and a tensor lr (PyTorch's own
    pattern for differentiable optimizers)."""
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    optimizer = make(lr)
    params, grads, state = _warm_state(optimizer, warmup=2)
    keys = list(params)
    spec = torch.utils._pytree.tree_structure(state)
    state_leaves = torch.utils._pytree.tree_leaves(state)
    tensor_idx = [i for i, t in enumerate(state_leaves) if isinstance(t, torch.Tensor)]

    def step(lr_value, *flat):
        p = dict(zip(keys, flat[: len(keys)]))
        g = dict(zip(keys, flat[len(keys) : 2 * len(keys)]))
        leaves = list(state_leaves)
        for i, t in zip(tensor_idx, flat[2 * len(keys) :]):
            leaves[i] = t
        s = torch.utils._pytree.tree_unflatten(leaves, spec)
        updates, s = make(lr_value).update(g, s, p)
        new = bl.apply_updates(p, updates)
        return (
            *new.values(),
            *(t for t in torch.utils._pytree.tree_leaves(s) if isinstance(t, torch.Tensor)),
        )

    grads["w"][0, 0] = 0.3  # away from the zero entry used elsewhere

    def leaf(t):
        return t.detach().clone().requires_grad_()

    inputs = (
        lr,
        *(leaf(p) for p in params.values()),
        *(leaf(g) for g in grads.values()),
        *(leaf(state_leaves[i]) for i in tensor_idx),
    )
    assert torch.autograd.gradcheck(step, inputs)


def test_safe_sqrt_forward_is_sqrt_and_derivative_is_finite_at_zero():
    x = torch.tensor([0.0, 1e-30, 4.0], dtype=torch.float64, requires_grad=True)
    y = bl.safe_sqrt(x)
    torch.testing.assert_close(y, x.detach().sqrt(), rtol=0, atol=0)
    (d,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(d, torch.tensor([0.0, 0.5e15, 0.25], dtype=torch.float64))


def test_hypergradient_through_adam_with_a_zero_gradient_entry_is_finite():
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    w0 = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}

    def inner(p, meta, data):  # the second coordinate has zero gradient at every step
        return (p["w"][0] - 3.0) ** 2 + 0.0 * p["w"][1]

    wK = bl.solve(inner, w0, None, optimizer=bl.adam(lr), steps=3)["w"]
    (d_lr,) = torch.autograd.grad(wK.sum(), lr)
    assert torch.isfinite(d_lr)
    eps = 1e-6  # central differences of the whole procedure in float64
    up = bl.solve(inner, w0, None, optimizer=bl.adam(0.1 + eps), steps=3)["w"].sum()
    down = bl.solve(inner, w0, None, optimizer=bl.adam(0.1 - eps), steps=3)["w"].sum()
    torch.testing.assert_close(d_lr, (up - down) / (2 * eps), rtol=1e-7, atol=1e-9)


def test_update_rejects_mismatched_keys_and_shapes():
    with bl.debug_checks():  # update re-checks structure only under the debug switch
        _update_rejects_mismatched_keys_and_shapes()


def _update_rejects_mismatched_keys_and_shapes():
    params, grads = _params_and_grads()
    for optimizer in (bl.sgd(0.1, momentum=0.9), bl.adam(), bl.rmsprop()):
        state = optimizer.init(params)
        with pytest.raises(ValueError, match=r"grads and state\.\w+ must have the same keys"):
            optimizer.update({"w": grads[0]["w"]}, state, params)
        with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(3, 4\)"):
            optimizer.update({"w": grads[0]["w"].T, "s": grads[0]["s"]}, state, params)
    with pytest.raises(ValueError, match="params must be a dict|same keys"):
        bl.sgd(0.1, weight_decay=0.1).update(grads[0], bl.sgd(0.1).init(params), {"w": params["w"]})
    with pytest.raises(ValueError, match="weight_decay needs the current params"):
        bl.adamw(weight_decay=0.1).update(grads[0], bl.adamw().init(params))


def test_factories_validate_hyper_parameters():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        bl.sgd(-0.1)
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        bl.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be \[0.0, 1.0\)"):
        bl.adam(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas must be a pair"):
        bl.adam(betas=0.9)
    with pytest.raises(TypeError, match="lr must be a float or a Tensor, got str"):
        bl.adam("0.1")
    with pytest.raises(TypeError, match="floating-point Tensor"):
        bl.sgd(torch.tensor(1))
    with pytest.raises(ValueError, match=r"alpha must be \[0.0, 1.0\)"):
        bl.rmsprop(alpha=1.5)


def test_update_checks_the_structure_only_under_the_debug_switch(monkeypatch):
    """init validates once; update walks the dicts again only when debugging: with every
    structure check replaced by a counter, a chain of all the transforms' updates calls none
    of them with the switch off, and each of them with it on."""
    import bilevel.clipping
    import bilevel.optimizers
    import bilevel.transform

    params, grads = _params_and_grads()
    transforms = [
        bl.chain(bl.clip_per_tensor(1.0), bl.scale(0.5), bl.sgd(0.1, momentum=0.9)),
        bl.adam(weight_decay=0.1),
        bl.adamw(weight_decay=0.1),
        bl.rmsprop(weight_decay=0.1, centered=True),
    ]
    states = [t.init(params) for t in transforms]  # init checks, before the counting
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[-1])

    for module, name in [
        (bilevel.optimizers, "check_tree"),
        (bilevel.optimizers, "check_grads"),
        (bilevel.optimizers, "check_matching"),
        (bilevel.transform, "check_tree"),
        (bilevel.clipping, "check_tree"),
    ]:
        monkeypatch.setattr(module, name, counted)

    def run_updates():
        for t, state in zip(transforms, states):
            for g in grads:
                t.update(g, state, params)

    run_updates()
    assert calls == []
    with bl.debug_checks():
        run_updates()
    assert len(calls) >= len(transforms) * len(grads)
