"""Per-tensor clipping (MemDLM), normalisation and global-norm clipping, with batch dims."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def _grads(scale=1.0):
    gen = torch.Generator().manual_seed(3)
    return {
        "big": 5.0 * scale * torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "small": 0.01 * scale * torch.randn(6, generator=gen, dtype=torch.float64),
        "scalar": torch.tensor(-2.5 * scale, dtype=torch.float64),
    }


def _norm(t):
    return torch.linalg.vector_norm(t)


def test_clip_per_tensor_matches_memdlm_formula():
    grads = _grads()
    clipped, _ = bl.clip_per_tensor(1.0).update(grads, (), None)
    for k, g in grads.items():
        factor = min(1.0, 1.0 / (float(_norm(g)) + 1e-12))
        torch.testing.assert_close(clipped[k], g * factor, rtol=1e-15, atol=0)
    # large tensors end at norm 1 (up to the 1e-12 floor); the small one is left alone
    torch.testing.assert_close(_norm(clipped["big"]), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(clipped["small"], grads["small"], rtol=0, atol=0)
    torch.testing.assert_close(clipped["scalar"], torch.tensor(-1.0, dtype=torch.float64))


def test_batch_dims_clip_each_problem_independently():
    gen = torch.Generator().manual_seed(0)
    grads = {
        "A": torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
        * torch.arange(5.0)[:, None, None],
        "B": torch.randn(5, 2, generator=gen, dtype=torch.float64),
    }
    for make in (
        lambda bd: bl.clip_per_tensor(0.7, batch_dims=bd),
        lambda bd: bl.normalize_per_tensor(batch_dims=bd),
        lambda bd: bl.clip_by_global_norm(0.7, batch_dims=bd),
    ):
        batched, _ = make(1).update(grads, (), None)
        for i in range(5):
            single, _ = make(0).update({k: g[i] for k, g in grads.items()}, (), None)
            for k in grads:
                torch.testing.assert_close(batched[k][i], single[k], rtol=1e-14, atol=1e-15)
        # and batch_dims=1 is what vmap over the leading dim computes
        single_problem = make(0)
        vmapped = torch.func.vmap(lambda g, t=single_problem: t.update(g, (), None)[0])(grads)
        for k in grads:
            torch.testing.assert_close(vmapped[k], batched[k], rtol=1e-14, atol=1e-15)


def test_normalize_per_tensor_gives_unit_norms():
    normalized, _ = bl.normalize_per_tensor().update(_grads(), (), None)
    for g in normalized.values():
        torch.testing.assert_close(_norm(g), torch.tensor(1.0, dtype=torch.float64))


def test_clip_by_global_norm_scales_all_tensors_by_one_factor():
    grads = _grads()
    total = torch.sqrt(sum(_norm(g) ** 2 for g in grads.values()))
    clipped, _ = bl.clip_by_global_norm(2.0).update(grads, (), None)
    for k, g in grads.items():
        torch.testing.assert_close(clipped[k], g * (2.0 / (total + 1e-12)), rtol=1e-15, atol=0)
    unchanged, _ = bl.clip_by_global_norm(1e6).update(grads, (), None)
    for k, g in grads.items():
        torch.testing.assert_close(unchanged[k], g, rtol=0, atol=0)


def test_clipping_is_differentiable_including_at_zero():
    """gradcheck in float64 away from the kink, and a finite derivative at g = 0 (unrolled
    MemDLM: LoRA A gets an exactly-zero gradient at the first inner step)."""
    g = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for transform in (
        bl.clip_per_tensor(0.5),
        bl.normalize_per_tensor(),
        bl.clip_by_global_norm(0.5),
    ):
        assert torch.autograd.gradcheck(
            lambda x, t=transform: t.update({"g": x}, (), None)[0]["g"], (g,)
        )
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out, _ = bl.clip_per_tensor(1.0).update({"g": zero}, (), None)
    (d,) = torch.autograd.grad(out["g"].sum(), zero)
    torch.testing.assert_close(d, torch.ones(3, dtype=torch.float64))


def test_clipping_validates_arguments():
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        bl.clip_per_tensor(-1.0)
    with pytest.raises(TypeError, match="batch_dims must be an int"):
        bl.clip_per_tensor(1.0, batch_dims=1.5)
    with pytest.raises(ValueError, match="batch_dims must be >= 0"):
        bl.normalize_per_tensor(batch_dims=-1)
    with pytest.raises(ValueError, match="batch_dims=2 exceeds the 1 dims"):
        bl.clip_per_tensor(1.0, batch_dims=2).update({"g": torch.ones(3)}, (), None)
    with pytest.raises(ValueError, match="must share its leading 1 dims"):
        bl.clip_by_global_norm(1.0, batch_dims=1).update(
            {"a": torch.ones(3, 2), "b": torch.ones(4, 2)}, (), None
        )
