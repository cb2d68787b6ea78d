"""Shared fixtures: seeded generators, float64 helpers, and the `gpu` marker policy.

Thread count and the Triton interpreter are fixed here, before any test module imports
torch or defines a kernel: timings on the shared 2-core machines are meaningless with
oversubscribed OpenMP pools, and `TRITON_INTERPRET` must be set before `@triton.jit` runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if not torch.cuda.is_available():
    # Kernel tests then run on CPU tensors through Triton's interpreter (fp32 only).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh CPU generator with a fixed seed, for code that takes `generator=`."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def f64():
    """Run the test body with float64 as the default dtype (gradient checks)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)


def assert_close(actual, expected, *, rtol=1e-10, atol=1e-12, msg=""):
    """`torch.testing.assert_close` with float64-appropriate defaults."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)
