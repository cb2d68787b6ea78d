"""Helpers for the library's one container type: ``dict[str, Tensor]`` (a "tree").

Parameters, gradients, updates and optimizer moments are all trees with the same keys and
shapes. Checking that at the boundary turns a silent broadcast into a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def check_tree(tree: Any, name: str) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``tree`` is a non-empty ``dict[str, Tensor]``."""
    if type(tree) is not dict and not isinstance(tree, Mapping):  # fast path: the ABC check is slow
        raise TypeError(f"{name} must be a dict[str, Tensor], got {type(tree).__name__}")
    if not tree:
        raise ValueError(f"{name} must hold at least one tensor, got an empty dict")
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {key!r} ({type(key).__name__})")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")


def is_empty_tree(obj: Any) -> bool:
    """True for a container that holds no tensor at any depth: ``{}``, ``()``, ``[]``,
    ``{"a": ()}``, ``(None,)``. Like a JAX pytree with no leaves (``None`` is an empty node).

    A bare ``None`` is *not* a container and returns False; a Tensor returns False.
    """
    if isinstance(obj, Mapping):
        return all(v is None or is_empty_tree(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(v is None or is_empty_tree(v) for v in obj)
    return False


def check_matching(tree: Mapping, like: Mapping, name: str, like_name: str) -> None:
    """Raise ``ValueError`` unless ``tree`` has exactly the keys and shapes of ``like``."""
    if tree.keys() != like.keys():
        missing = sorted(like.keys() - tree.keys())
        extra = sorted(tree.keys() - like.keys())
        raise ValueError(
            f"{name} and {like_name} must have the same keys; {name} is missing {missing} "
            f"and has unexpected {extra}"
        )
    for key, value in tree.items():
        if value.shape != like[key].shape:
            raise ValueError(
                f"{name}[{key!r}] has shape {tuple(value.shape)} but {like_name}[{key!r}] has "
                f"shape {tuple(like[key].shape)}; expected equal shapes"
            )


def tensor_norm(t: Tensor, batch_dims: int = 0) -> Tensor:
    """Euclidean norm of ``t`` over all dims after the first ``batch_dims``.

    Shape ``t.shape[:batch_dims]``: one norm per independent problem.
    """
    if batch_dims > t.dim():
        raise ValueError(
            f"batch_dims={batch_dims} exceeds the {t.dim()} dims of a tensor of shape "
            f"{tuple(t.shape)}"
        )
    if batch_dims == t.dim():
        return t.abs()
    if batch_dims == 0:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(batch_dims, t.dim())))


def global_norm(tree: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
    """sqrt(sum over tensors of ||t||^2), per batch element: shape ``batch shape``."""
    squares = [tensor_norm(t, batch_dims).square() for t in tree.values()]
    if batch_dims:
        shapes = {tuple(s.shape) for s in squares}
        if len(shapes) != 1:
            raise ValueError(
                f"with batch_dims={batch_dims} every tensor must share its leading "
                f"{batch_dims} dims; got batch shapes {sorted(shapes)}"
            )
    return torch.stack(squares).sum(0).sqrt()


def expand_to(factor: Tensor, t: Tensor) -> Tensor:
    """Append singleton dims to a batch-shaped ``factor`` so it broadcasts against ``t``."""
    if factor.dim() == 0:
        return factor
    return factor.reshape(factor.shape + (1,) * (t.dim() - factor.dim()))


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping) -> Tree:
    """``{k: fn(tree[k], *(r[k] for r in rest))}`` (keys are assumed already checked)."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def detach(obj: Any) -> Any:
    """Detach every tensor inside nested dicts, lists, tuples and NamedTuples."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, Mapping):
        return {k: detach(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(detach(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(detach(v) for v in obj)
    return obj


def flatten(tree: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a tree into one 1-D vector (keys in insertion order)."""
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten`: split ``vector`` into tensors shaped like ``like``."""
    sizes = [t.numel() for t in like.values()]
    pieces = torch.split(vector, sizes)
    return {k: piece.reshape(t.shape) for (k, t), piece in zip(like.items(), pieces)}
