"""Differentiable optimizers that follow ``torch.optim`` step for step.

Each factory returns a :class:`~bilevel.transform.GradientTransformation`; the returned updates
are added to the parameters with :func:`~bilevel.apply_updates`. Hyper-parameters may be floats
or tensors that require grad (their hypergradients are then exact in unrolled mode). A
hyper-parameter that is the Python number 0 switches its term off, as in ``torch.optim``.

Conventions (``torch.optim``, PyTorch 2.x, ``maximize=False``, no ``dampening``):

* SGD: ``g += wd*p``; ``b = mu*b + g`` with ``b`` starting at the first gradient (a zero buffer
  gives exactly that); ``g = g + mu*b`` (Nesterov) or ``b``; ``p -= lr*g``.
* Adam: ``g += wd*p``; ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g^2``;
  ``p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`` (Kingma & Ba 2015, Alg. 1, with
  torch's placement of eps).
* AdamW: ``p *= 1 - lr*wd`` before the Adam step without weight decay (Loshchilov & Hutter 2019).
* RMSprop: ``g += wd*p``; ``s = a*s + (1-a)*g^2``; centered: ``c = a*c + (1-a)*g``, the
  denominator uses ``s - c^2``; ``d = sqrt(.) + eps``; with momentum ``b = mu*b + g/d``,
  ``p -= lr*b``, else ``p -= lr*g/d`` (Hinton, Lecture 6e; Graves 2013 for centering).

Square roots of second moments use :func:`safe_sqrt`, whose derivative at exactly 0 is 0
instead of inf, so differentiating through a step with an exactly-zero gradient entry gives a
finite hypergradient; the forward values are those of ``torch.sqrt``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bilevel._debug import debug_checks_enabled
from bilevel._tree import Tree, check_matching, check_tree
from bilevel.transform import GradientTransformation, Hyper, check_grads, check_hyper, is_zero


class SgdState(NamedTuple):
    """Momentum buffers (an empty dict when momentum is off)."""

    momentum: Tree


class AdamState(NamedTuple):
    """Step count (a Python int, the ``t`` of the bias corrections) and the two moments."""

    count: int
    mu: Tree
    nu: Tree


class RmspropState(NamedTuple):
    """Mean square ``s``, mean gradient ``c`` (centered only) and momentum buffers."""

    square_avg: Tree
    grad_avg: Tree
    momentum: Tree


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with derivative 0 (not inf) where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def _zeros(params: Tree) -> Tree:
    return {k: torch.zeros_like(p) for k, p in params.items()}


def _check_params_for_decay(params: Tree | None, grads: Tree) -> Tree:
    if params is None:
        raise ValueError("weight_decay needs the current params: call update(grads, state, params)")
    if debug_checks_enabled():
        check_tree(params, "params")
        check_matching(params, grads, "params", "grads")
    return params


def _add_decay(grads: Tree, params: Tree | None, weight_decay: Hyper) -> Tree:
    """L2 penalty folded into the gradient: ``g + wd * p``."""
    if is_zero(weight_decay):
        return grads
    params = _check_params_for_decay(params, grads)
    return {k: g + weight_decay * params[k] for k, g in grads.items()}


def sgd(
    lr: Hyper,
    momentum: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent with optional (Nesterov) momentum, as ``torch.optim.SGD``."""
    check_hyper(lr, "lr")
    check_hyper(momentum, "momentum")
    check_hyper(weight_decay, "weight_decay")
    if nesterov and is_zero(momentum):
        raise ValueError("nesterov=True requires momentum > 0, got momentum=0")
    use_momentum = not is_zero(momentum)

    def init(params: Tree) -> SgdState:
        check_tree(params, "params")
        return SgdState(_zeros(params) if use_momentum else {})

    def update(grads: Tree, state: SgdState, params: Tree | None = None) -> tuple[Tree, SgdState]:
        if debug_checks_enabled():  # init checked params; the state carries their structure
            if use_momentum:
                check_grads(grads, state.momentum, "state.momentum")
            else:
                check_tree(grads, "grads")
        grads = _add_decay(grads, params, weight_decay)
        if use_momentum:
            buffers = {k: momentum * state.momentum[k] + g for k, g in grads.items()}
            if nesterov:
                grads = {k: g + momentum * buffers[k] for k, g in grads.items()}
            else:
                grads = buffers
            state = SgdState(buffers)
        return {k: -lr * g for k, g in grads.items()}, state

    return GradientTransformation(init, update)


def _adam_step(
    grads: Tree, state: AdamState, lr: Hyper, b1: Hyper, b2: Hyper, eps: Hyper
) -> tuple[Tree, AdamState]:
    """The shared Adam direction: returns ``-lr * m_hat / (sqrt(v_hat) + eps)`` per key."""
    if debug_checks_enabled():
        check_grads(grads, state.mu, "state.mu")
    count = state.count + 1
    mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in grads.items()}
    nu = {k: b2 * state.nu[k] + (1 - b2) * g * g for k, g in grads.items()}
    step_size = lr / (1 - b1**count)
    bias2_sqrt = (1 - b2**count) ** 0.5
    updates = {k: -step_size * m / (safe_sqrt(nu[k]) / bias2_sqrt + eps) for k, m in mu.items()}
    return updates, AdamState(count, mu, nu)


def _check_adam_hypers(lr, betas, eps, weight_decay) -> tuple[Hyper, Hyper]:
    check_hyper(lr, "lr")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (b1, b2), got {betas!r}")
    check_hyper(betas[0], "betas[0]", high=1.0)
    check_hyper(betas[1], "betas[1]", high=1.0)
    check_hyper(eps, "eps")
    check_hyper(weight_decay, "weight_decay")
    return betas[0], betas[1]


def _adam_init(params: Tree) -> AdamState:
    check_tree(params, "params")
    return AdamState(0, _zeros(params), _zeros(params))


def adam(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
) -> GradientTransformation:
    """Adam with L2 weight decay folded into the gradient, as ``torch.optim.Adam``."""
    b1, b2 = _check_adam_hypers(lr, betas, eps, weight_decay)

    def update(grads: Tree, state: AdamState, params: Tree | None = None) -> tuple[Tree, AdamState]:
        return _adam_step(_add_decay(grads, params, weight_decay), state, lr, b1, b2, eps)

    return GradientTransformation(_adam_init, update)


def adamw(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2,
) -> GradientTransformation:
    """Adam with decoupled weight decay ``p *= 1 - lr*wd``, as ``torch.optim.AdamW``."""
    b1, b2 = _check_adam_hypers(lr, betas, eps, weight_decay)

    def update(grads: Tree, state: AdamState, params: Tree | None = None) -> tuple[Tree, AdamState]:
        updates, state = _adam_step(grads, state, lr, b1, b2, eps)
        if not is_zero(weight_decay):
            params = _check_params_for_decay(params, grads)
            updates = {k: u - (lr * weight_decay) * params[k] for k, u in updates.items()}
        return updates, state

    return GradientTransformation(_adam_init, update)


def rmsprop(
    lr: Hyper = 1e-2,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    *,
    centered: bool = False,
) -> GradientTransformation:
    """RMSprop (optionally centered, with momentum), as ``torch.optim.RMSprop``."""
    check_hyper(lr, "lr")
    check_hyper(alpha, "alpha", high=1.0)
    check_hyper(eps, "eps")
    check_hyper(weight_decay, "weight_decay")
    check_hyper(momentum, "momentum")
    use_momentum = not is_zero(momentum)

    def init(params: Tree) -> RmspropState:
        check_tree(params, "params")
        return RmspropState(
            _zeros(params),
            _zeros(params) if centered else {},
            _zeros(params) if use_momentum else {},
        )

    def update(
        grads: Tree, state: RmspropState, params: Tree | None = None
    ) -> tuple[Tree, RmspropState]:
        if debug_checks_enabled():
            check_grads(grads, state.square_avg, "state.square_avg")
        s_old = state.square_avg
        grads = _add_decay(grads, params, weight_decay)
        square_avg = {k: alpha * s_old[k] + (1 - alpha) * g * g for k, g in grads.items()}
        grad_avg = state.grad_avg
        if centered:
            grad_avg = {k: alpha * grad_avg[k] + (1 - alpha) * g for k, g in grads.items()}
            variance = {k: s - grad_avg[k] * grad_avg[k] for k, s in square_avg.items()}
        else:
            variance = square_avg
        scaled = {k: g / (safe_sqrt(variance[k]) + eps) for k, g in grads.items()}
        buffers = state.momentum
        if use_momentum:
            buffers = {k: momentum * buffers[k] + s for k, s in scaled.items()}
            scaled = buffers
        updates = {k: -lr * s for k, s in scaled.items()}
        return updates, RmspropState(square_avg, grad_avg, buffers)

    return GradientTransformation(init, update)
