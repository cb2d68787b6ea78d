"""Boundary validation shared by the public functions: every message names the function, the
argument, the value received and what was expected.

Two kinds of check. Type, dimension, shape and dtype checks read only Python metadata and
always run. Value checks (t in range, x0 free of mask_id, a mask inside maskable) must read
tensor values back to the host, which stalls an accelerator stream and breaks a compiled graph,
so they run only when the opt-in debug switch is on: `dd.debug_checks(True)` (also usable as
`with dd.debug_checks():`) or the environment variable DIFFUSION_DEBUG_CHECKS=1.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_ENV = "DIFFUSION_DEBUG_CHECKS"
_debug = {"on": os.environ.get(_ENV, "").strip() not in ("", "0", "false", "False")}


class debug_checks:  # a switch that reads as a function, like torch's anomaly mode
    """Turn the value checks (they sync the device) on or off, now; as a context manager,
    restore the previous setting on exit.

    `dd.debug_checks(True)` for a whole debugging session, `with dd.debug_checks():` for a
    block. Off by default (unless DIFFUSION_DEBUG_CHECKS=1): then no library call in the
    training step reads a tensor value back to the host.
    """

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"debug_checks: enabled must be a bool, got {enabled!r}")
        self.previous = _debug["on"]
        _debug["on"] = enabled

    def __enter__(self) -> debug_checks:
        return self

    def __exit__(self, *exc_info) -> bool:
        _debug["on"] = self.previous
        return False


def debug_checks_enabled() -> bool:
    """Whether the value checks run (never while `torch.compile` traces: they would break
    the graph)."""
    return _debug["on"] and not torch.compiler.is_compiling()


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
