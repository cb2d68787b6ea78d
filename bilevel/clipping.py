"""Gradient clipping and normalisation transforms (stateless).

``batch_dims=k`` treats the first ``k`` dims of every tensor as independent problems, e.g.
per-sample fast weights with a leading batch dim: norms are then taken over the remaining dims
only and each problem is scaled by its own factor. All factors are smooth in the gradient
(no data-dependent branches), so the transforms work under ``vmap``, ``torch.compile`` and
unrolled differentiation.
"""

from __future__ import annotations

import numbers

from torch import Tensor

from bilevel._debug import debug_checks_enabled
from bilevel._tree import Tree, check_tree, expand_to, global_norm, tensor_norm
from bilevel.transform import GradientTransformation, check_hyper

_CLIP_EPS = 1e-12  # MemDLM's floor in max_norm / (||g|| + eps)


def _check_batch_dims(batch_dims: object) -> None:
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, numbers.Integral):
        raise TypeError(f"batch_dims must be an int, got {type(batch_dims).__name__}")
    if batch_dims < 0:
        raise ValueError(f"batch_dims must be >= 0, got {batch_dims}")


def _stateless(scale_tree) -> GradientTransformation:
    """Wrap ``scale_tree(grads) -> updates`` as a transformation with empty state."""

    def init(params: Tree) -> tuple:
        check_tree(params, "params")
        return ()

    def update(grads: Tree, state: tuple, params: Tree | None = None) -> tuple[Tree, tuple]:
        if debug_checks_enabled():
            check_tree(grads, "grads")
        return scale_tree(grads), state

    return GradientTransformation(init, update)


def clip_per_tensor(max_norm: float | Tensor, *, batch_dims: int = 0) -> GradientTransformation:
    """Scale each tensor's gradient g by ``min(1, max_norm / (||g|| + 1e-12))`` (MemDLM).

    Every tensor is clipped on its own (MemDLM's "local per-parameter normalisation",
    arXiv 2603.22241 §4.4), unlike :func:`clip_by_global_norm`. For a gradient of shape
    ``(B, ...)`` with ``batch_dims=1`` the norm has shape ``(B,)``.
    """
    check_hyper(max_norm, "max_norm")
    _check_batch_dims(batch_dims)

    def clip(g: Tensor) -> Tensor:
        factor = (max_norm / (tensor_norm(g, batch_dims) + _CLIP_EPS)).clamp(max=1.0)
        return g * expand_to(factor, g)

    return _stateless(lambda grads: {k: clip(g) for k, g in grads.items()})


def normalize_per_tensor(eps: float = 1e-12, *, batch_dims: int = 0) -> GradientTransformation:
    """Replace each tensor's gradient g by ``g / (||g|| + eps)`` (unit norm per tensor)."""
    check_hyper(eps, "eps")
    _check_batch_dims(batch_dims)

    def normalize(g: Tensor) -> Tensor:
        return g / expand_to(tensor_norm(g, batch_dims) + eps, g)

    return _stateless(lambda grads: {k: normalize(g) for k, g in grads.items()})


def clip_by_global_norm(max_norm: float | Tensor, *, batch_dims: int = 0) -> GradientTransformation:
    """Scale all gradients by ``min(1, max_norm / (N + 1e-12))``, N = the global norm.

    N = sqrt(sum over tensors of ||g||^2), computed per batch element when ``batch_dims > 0``
    (every tensor must then share its leading ``batch_dims`` dims).
    """
    check_hyper(max_norm, "max_norm")
    _check_batch_dims(batch_dims)

    def clip(grads: Tree) -> Tree:
        factor = (max_norm / (global_norm(grads, batch_dims) + _CLIP_EPS)).clamp(max=1.0)
        return {k: g * expand_to(factor, g) for k, g in grads.items()}

    return _stateless(clip)
