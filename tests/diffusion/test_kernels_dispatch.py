"""Backend dispatch: "auto" picks the kernel on CUDA only, the environment variable steers "auto",
an explicit argument wins, forcing the kernel on CPU needs the interpreter, and a compiled
region always gets the reference."""

from __future__ import annotations

import pytest
import torch

import diffusion as dd
from diffusion.kernels import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    return monkeypatch


def test_auto_uses_the_kernel_on_cuda_only(clean_env):
    assert dispatch.resolve_backend("auto", CPU, fn="f") == "reference"
    clean_env.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.resolve_backend("auto", CUDA, fn="f") == "triton"
    clean_env.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.resolve_backend("auto", CUDA, fn="f") == "reference"


def test_environment_variable_steers_auto_but_not_an_explicit_choice(clean_env):
    clean_env.setattr(dispatch, "triton_available", lambda: True)
    clean_env.setenv(dispatch.BACKEND_ENV, "reference")
    assert dispatch.resolve_backend("auto", CUDA, fn="f") == "reference"
    assert dispatch.resolve_backend("triton", CUDA, fn="f") == "triton"
    clean_env.setenv(dispatch.BACKEND_ENV, "triton")
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend("auto", CPU, fn="f") == "triton"
    assert dispatch.resolve_backend("reference", CPU, fn="f") == "reference"
    clean_env.setenv(dispatch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="DIFFUSION_KERNELS must be one of"):
        dispatch.resolve_backend("auto", CPU, fn="f")


def test_forcing_the_kernel_on_cpu_needs_the_interpreter(clean_env):
    clean_env.setattr(dispatch, "triton_available", lambda: True)
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", CPU, fn="my_fn")
    clean_env.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the optional package triton"):
        dispatch.resolve_backend("triton", CUDA, fn="my_fn")
    with pytest.raises(ValueError, match="my_fn: backend must be one of"):
        dispatch.resolve_backend("cuda", CPU, fn="my_fn")


def test_a_compiled_region_gets_the_reference(clean_env):
    clean_env.setattr(dispatch, "triton_available", lambda: True)
    clean_env.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.resolve_backend("auto", CUDA, fn="f") == "reference"


def test_the_environment_variable_reaches_the_public_functions(clean_env):
    clean_env.setenv(dispatch.BACKEND_ENV, "nonsense")
    hidden, weight = torch.zeros(2, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="DIFFUSION_KERNELS"):
        dd.kernels.linear_cross_entropy(hidden, weight, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="DIFFUSION_KERNELS"):
        dd.kernels.propose(
            torch.zeros(1, 2, 4),
            torch.ones(1, 2, dtype=torch.bool),
            mask_id=3,
            temperature=0.0,
            remasking="margin",
        )
