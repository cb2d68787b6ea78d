"""`one_sample` / `per_sample_size`: one row of a bound per-sample state, as a shared state, for
code that runs samples one at a time through modules that flatten the batch (MoE experts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memory as mm


def per_sample_lora(batch=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5, dtype=torch.float64))
    mem = mm.FastLoRA(model, ["0"], rank=2, alpha=4.0)
    g = torch.Generator().manual_seed(seed)
    state = mem.init(batch_size=batch, generator=g, dtype=torch.float64)
    state = {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
    return model, mem, state


def test_one_sample_computes_with_that_rows_merged_weight_on_flat_rows():
    model, mem, state = per_sample_lora()
    rows = torch.randn(7, 4, dtype=torch.float64)  # no batch dim: what a routed expert sees
    weights = mem.merged_weight("0", state)  # (3, 5, 4)
    with mem.bind(state):
        assert mm.per_sample_size(model) == 3
        for b in range(3):
            with mm.one_sample(model, b):
                assert mm.per_sample_size(model) is None
                out = model(rows)
            expected = rows @ weights[b].T + model[0].bias
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="per-sample with batch size 3"):
            model(rows)  # the per-sample state is back
    assert mm.per_sample_size(model) is None


def test_gradients_reach_only_the_row_in_use():
    model, mem, state = per_sample_lora()
    state = {k: v.requires_grad_() for k, v in state.items()}
    rows = torch.randn(6, 4, dtype=torch.float64)
    with mem.bind(state), mm.one_sample(model, 1):
        model(rows).square().sum().backward()
    grad_b = state["0.B"].grad
    assert grad_b[1].abs().sum() > 0
    assert grad_b[0].abs().sum() == 0 and grad_b[2].abs().sum() == 0
    # the same gradient as binding that row alone, as a shared state
    alone = {k: v[1].detach().clone().requires_grad_() for k, v in state.items()}
    with mem.bind(alone):
        model(rows).square().sum().backward()
    torch.testing.assert_close(grad_b[1], alone["0.B"].grad, rtol=1e-12, atol=1e-12)


def test_a_shared_state_or_none_has_no_per_sample_batch_and_one_sample_refuses():
    model, mem, state = per_sample_lora()
    with pytest.raises(RuntimeError, match="needs a per-sample state"), mm.one_sample(model, 0):
        pass
    with mem.bind({k: v[0] for k, v in state.items()}):
        assert mm.per_sample_size(model) is None
    with mem.bind(state):
        for bad in (3, -1, True):
            with (
                pytest.raises(ValueError, match="index must be an int in"),
                mm.one_sample(model, bad),
            ):
                pass


def test_leaving_through_an_exception_restores_the_per_sample_state():
    model, mem, state = per_sample_lora()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with mem.bind(state):
        before = model(x)
        with pytest.raises(KeyError), mm.one_sample(model, 2):
            raise KeyError("boom")
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
