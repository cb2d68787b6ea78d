"""Host memory: keep freed memory in the process instead of returning it to the OS at every step.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc hands memory back to the OS
when the free space at the top of its heap exceeds a trim threshold, and serves large requests
with fresh `mmap`s; both thresholds move with the program's history. A forward pass without
gradient (MemDLM's pre-anchor state) frees each activation right after its use, so glibc gives
the same pages back and faults them in again for the next layer: on the `cpu-tiny` preset
that was about 36,000 minor page faults and a tenth of a MemDLM step spent in the kernel
(benchmarks/results/memdlm_step_cpu_2026-12-05b.md). Fixed thresholds remove it, as for any
long-running numeric program (the same fix as `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`).
The cost: the process keeps up to its peak heap until it exits.

Where it applies: the command line (`cli.main`), each compare worker, and the library path
too, where a training step can start: `method.make_fast_weights` (every MemDLM step, the API's
`fast_weights`, evaluation's adapted losses) and `loop.train_phase` (either method). A user
calling the library thus gets the same step cost as the command line (on the Hugging Face
benchmark, benchmarks/results/memdlm_step_hf_cpu_2026-12-07.md, 25,000-96,000 minor faults per
step without it). The first call decides; later calls return its answer and do nothing.

Only glibc is touched; elsewhere (macOS, musl, Windows) this does nothing. Thresholds the user
set through glibc's environment variables are left as they are (and `MALLOC_TOP_PAD_` keeps
glibc's dynamic behaviour, as it does for glibc itself).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # requests above 32 MiB still get their own mapping
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap

_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_DECIDED: list[bool] = []  # the first call's answer: the setting is per process, made once


def keep_freed_memory() -> bool:
    """Pin glibc's mmap and trim thresholds (see the module docstring) for this process, once.

    Returns True when they are set (by this call or an earlier one); False off glibc, or when
    the user set them through the environment. Idempotent: only the first call acts.
    """
    if not _DECIDED:
        _DECIDED.append(_pin())
    return _DECIDED[0]


def _pin() -> bool:
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
