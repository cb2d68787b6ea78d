"""Boundary validation shared by the public functions: every message names the function, the
argument, the value received and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor


def check_int(fn: str, name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def check_tensor(
    fn: str, name: str, value, *, ndim: int, dtype: str, shape: tuple | None = None
) -> Tensor:
    """`dtype` is "long" (any integer dtype), "bool" or "float"."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(
            f"{fn}: {name} must have {ndim} dimensions, got shape {tuple(value.shape)}"
        )
    ok = {
        "long": not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool,
        "bool": value.dtype == torch.bool,
        "float": value.is_floating_point(),
    }[dtype]
    if not ok:
        raise TypeError(f"{fn}: {name} must be a {dtype} tensor, got dtype {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value


def check_mask_id(fn: str, mask_id) -> int:
    return check_int(fn, "mask_id", mask_id, minimum=0)


def check_times(fn: str, t: Tensor, *, allow_zero: bool) -> None:
    """t must lie in [0, 1] (allow_zero) or (0, 1], and be finite."""
    low_ok = (t >= 0) if allow_zero else (t > 0)
    if not bool((low_ok & (t <= 1)).all()):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        bad = t[~(low_ok & (t <= 1))]
        raise ValueError(f"{fn}: t must lie in {interval}, got values such as {bad[:4].tolist()}")
