"""The library's warning category and the test for "may a tensor steer Python control flow"."""

from __future__ import annotations

import warnings

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters


class BilevelWarning(UserWarning):
    """A hypergradient may be inaccurate or empty (filter with this category)."""


def warn(message: str, *, depth: int = 1) -> None:
    """Emit a :class:`BilevelWarning` attributed to the frame ``depth`` levels above the caller
    (``depth=1``: the caller's caller, i.e. the user of a public function)."""
    warnings.warn(message, BilevelWarning, stacklevel=2 + depth)


def is_concrete() -> bool:
    """True when tensors hold real values that Python may branch on.

    False while ``torch.compile`` traces or inside ``vmap``: there a data-dependent ``if`` is
    an error, so value checks and early exits are skipped.
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is None:  # no transform at all: fast path
        return True
    return not any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def under_functorch_transform() -> bool:
    """True inside ``torch.func.grad``/``vmap``/... (or while compiling).

    There, inner gradients must be taken with ``torch.func`` so that they compose with the
    enclosing transforms; eager code can use the cheaper ``torch.autograd.grad``.
    """
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None
