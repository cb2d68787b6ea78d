"""Which implementation runs a kernel: the Triton kernel or its pure-PyTorch reference.

    backend="auto"       the environment variable DIFFUSION_KERNELS if it is set ("reference" or
                         "triton"), else the Triton kernel for CUDA tensors when `triton` imports,
                         else the reference. While `torch.compile` traces, "auto" is always the
                         reference (the variable is not read): inductor fuses the reference itself,
                         and eager kernel launches stay out of the graph.
    backend="reference"  always the PyTorch reference (any device, any dtype, torch.func, compile).
    backend="triton"     always the kernel; on CPU tensors only under Triton's interpreter
                         (TRITON_INTERPRET=1 set before the first kernel launch), else an error.

An explicit argument wins over the environment variable; the variable only steers "auto".
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["BACKENDS", "BACKEND_ENV", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "reference", "triton")
BACKEND_ENV = "DIFFUSION_KERNELS"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the optional dependency `triton` imports."""
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """Triton's CPU interpreter is on (it runs kernels on CPU tensors, slowly, fp32 only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, *, fn: str) -> str:
    """ "reference" or "triton" for inputs on `device` (see the module docstring).

    Args:
        backend: "auto", "reference" or "triton".
        device: the device of the kernel's inputs.
        fn: the public function's name, for error messages.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and torch.compiler.is_compiling():
        return "reference"
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV) or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"{fn}: environment variable {BACKEND_ENV} must be one of {BACKENDS}, "
                f"got {backend!r}"
            )
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{fn}: backend='triton' needs the optional package triton")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"{fn}: backend='triton' got tensors on {device}; the kernels run on CUDA, or on "
                "CPU under Triton's interpreter (set TRITON_INTERPRET=1 before the first launch)"
            )
    return backend
