"""Gradient transformations: pure ``(init, update)`` pairs over ``dict[str, Tensor]`` (optax style).

A transformation never updates anything in place, so every update is differentiable with
respect to the gradients, the parameters, the state and any tensor hyper-parameter. That is
what lets :func:`bilevel.solve` back-propagate through an inner loop.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

from bilevel._debug import debug_checks_enabled
from bilevel._tree import Tree, check_matching, check_tree

Hyper = float | Tensor


class GradientTransformation(NamedTuple):
    """A pair of pure functions.

    ``init(params) -> state`` builds the state for a parameter tree;
    ``update(grads, state, params=None) -> (updates, state)`` maps gradients to updates
    (to be *added* to the parameters with :func:`apply_updates`).
    """

    init: Callable[[Tree], Any]
    update: Callable[..., tuple[Tree, Any]]


def check_hyper(value: Any, name: str, *, low: float = 0.0, high: float | None = None) -> None:
    """Validate a hyper-parameter: a real number in ``[low, high)`` or a floating tensor.

    Tensors are accepted without a range check (that would need a device sync) so that they
    can require grad and be meta-learned.
    """
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point Tensor, got dtype {value.dtype}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a Tensor, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bounds = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def is_zero(value: Hyper) -> bool:
    """True for a Python number equal to 0 (a tensor hyper-parameter is never skipped)."""
    return not isinstance(value, Tensor) and value == 0


def check_grads(grads: Any, like: Mapping[str, Tensor], like_name: str) -> None:
    """``grads`` must be a tree with the keys and shapes of ``like`` (the state's tree)."""
    check_tree(grads, "grads")
    check_matching(grads, like, "grads", like_name)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` left to right: each one's updates are the next one's gradients.

    ``chain(clip_per_tensor(1.0), sgd(0.1))`` clips each gradient, then takes an SGD step.
    The state is the tuple of the members' states. The members are checked here, once; the
    state's arity at each ``update`` only under ``bl.debug_checks(True)``.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain argument {i} must be a GradientTransformation, got {type(t).__name__}"
            )

    def init(params: Tree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Tree, state: tuple, params: Tree | None = None) -> tuple[Tree, tuple]:
        if debug_checks_enabled() and (
            not isinstance(state, tuple) or len(state) != len(transforms)
        ):
            raise ValueError(
                f"chain of {len(transforms)} transforms got a state of type "
                f"{type(state).__name__} with {len(state) if isinstance(state, tuple) else '?'} "
                "entries; pass the state returned by this chain's init"
            )
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return GradientTransformation(init, update)


def scale(factor: Hyper) -> GradientTransformation:
    """Multiply every gradient by ``factor`` (a float or a Tensor, possibly requiring grad)."""
    check_hyper(factor, "factor", low=-float("inf"))

    def init(params: Tree) -> tuple:
        check_tree(params, "params")
        return ()

    def update(grads: Tree, state: tuple, params: Tree | None = None) -> tuple[Tree, tuple]:
        if debug_checks_enabled():
            check_tree(grads, "grads")
        return {k: factor * g for k, g in grads.items()}, state

    return GradientTransformation(init, update)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``{k: params[k] + updates[k]}``; a new dict, nothing modified in place."""
    check_tree(params, "params")
    check_tree(updates, "updates")
    check_matching(updates, params, "updates", "params")
    return {k: p + updates[k] for k, p in params.items()}
