"""MAML on a small MLP: bilevel agrees with the peer libraries higher and torchopt (float64).

SGD inner loop (higher's Adam uses an older epsilon placement, so it is not an oracle for Adam).
"""

from __future__ import annotations

import higher  # peer oracles from the dev extra: a missing one must fail, not skip
import pytest
import torch
import torchopt
from torch import nn

import bilevel as bl

TASKS, SHOTS, STEPS, LR = 3, 6, 3, 0.1


def _setup():
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    data = [torch.randn(TASKS, SHOTS, d, generator=gen, dtype=torch.float64) for d in (2, 1, 2, 1)]
    return net, data


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _bilevel_meta_gradient(net, data, mode, optimizer):
    xs, ys, xq, yq = data
    params = dict(net.named_parameters())

    def inner(p, meta, batch):
        x, y = batch
        return _mse(torch.func.functional_call(net, p, (x,)), y)

    def task(x_s, y_s, x_q, y_q):
        adapted = bl.solve(
            inner, params, None, optimizer=optimizer, steps=STEPS, mode=mode, data=(x_s, y_s)
        )
        return inner(adapted, None, (x_q, y_q))

    loss = torch.func.vmap(task)(xs, ys, xq, yq).mean()
    return torch.autograd.grad(loss, list(params.values()))


def _higher_meta_gradient(net, data, first_order=False, momentum=0.0):
    xs, ys, xq, yq = data
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=momentum)
    total = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(TASKS):
        with higher.innerloop_ctx(
            net, opt, copy_initial_weights=False, track_higher_grads=not first_order
        ) as (fnet, diffopt):
            for _ in range(STEPS):
                diffopt.step(_mse(fnet(xs[i]), ys[i]))
            query = _mse(fnet(xq[i]), yq[i]) / TASKS
            if first_order:  # FOMAML: the gradient at the adapted weights is the meta-gradient
                grads = torch.autograd.grad(query, fnet.parameters())
            else:
                grads = torch.autograd.grad(query, list(net.parameters()))
        total = [t + g for t, g in zip(total, grads)]
    return total


def _torchopt_meta_gradient(net, data, momentum=0.0):
    xs, ys, xq, yq = data
    names = [n for n, _ in net.named_parameters()]
    leaves = list(net.parameters())
    total = [torch.zeros_like(p) for p in leaves]
    for i in range(TASKS):
        opt = torchopt.sgd(LR, momentum=momentum)
        params = tuple(leaves)
        state = opt.init(params)
        for _ in range(STEPS):
            out = torch.func.functional_call(net, dict(zip(names, params)), (xs[i],))
            grads = torch.autograd.grad(_mse(out, ys[i]), params, create_graph=True)
            updates, state = opt.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        out = torch.func.functional_call(net, dict(zip(names, params)), (xq[i],))
        grads = torch.autograd.grad(_mse(out, yq[i]) / TASKS, leaves)
        total = [t + g for t, g in zip(total, grads)]
    return total


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_maml_meta_gradient_matches_higher_and_torchopt(momentum):
    net, data = _setup()
    ours = _bilevel_meta_gradient(net, data, bl.Unrolled(), bl.sgd(LR, momentum=momentum))
    for peer in (
        _higher_meta_gradient(net, data, momentum=momentum),
        _torchopt_meta_gradient(net, data, momentum=momentum),
    ):
        for a, b in zip(ours, peer):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
            assert b.abs().max() > 1e-3  # a non-trivial meta-gradient


def test_fomaml_meta_gradient_matches_higher():
    net, data = _setup()
    ours = _bilevel_meta_gradient(net, data, bl.FirstOrder(), bl.sgd(LR))
    for a, b in zip(ours, _higher_meta_gradient(net, data, first_order=True)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
