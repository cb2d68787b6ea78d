"""FullFastWeights: (W + delta) x, per-sample batching, and the delta rule in closed form."""

from __future__ import annotations

import pytest
import torch

import memory as mm
from tests.memory.helpers import (
    Associative,
    association_task,
    randomize,
    recall_accuracy,
    recall_loss,
    sgd_steps,
    tiny_model,
    tokens,
)


def test_init_is_zero_with_the_weight_shape():
    model = tiny_model(torch.float64)
    mem = mm.FullFastWeights(model, mm.last_layers(model, 0.5))
    state = mem.init(batch_size=2, generator=torch.Generator().manual_seed(0))
    assert set(state) == {f"{t}.delta" for t in mem.targets}
    for name in mem.targets:
        delta = state[f"{name}.delta"]
        assert delta.shape == (2, *model.get_submodule(name).weight.shape)
        # the float64 model's dtype (at least float32 by default)
        assert delta.dtype == torch.float64 and torch.count_nonzero(delta) == 0
    assert mem.state_shapes == {
        f"{t}.delta": tuple(model.get_submodule(t).weight.shape) for t in mem.targets
    }


@pytest.mark.parametrize("batch_size", [None, 2])
def test_init_state_leaves_outputs_bit_identical(batch_size):
    model = tiny_model()
    x = tokens(2, 6)
    bare = model(x)
    mem = mm.FullFastWeights(model, mm.select(model, r"layers\.\d\.(mlp|attn)\.\w+_proj"))
    with mem.bind(mem.init(batch_size=batch_size)):
        assert torch.equal(model(x), bare)


def test_bound_state_equals_w_plus_delta_computed_by_hand():
    model, reference = tiny_model(torch.float64), tiny_model(torch.float64)
    x = tokens(2, 5)
    targets = ["layers.0.attn.o_proj", *mm.last_layers(model, 0.5)]  # o_proj has a bias
    mem = mm.FullFastWeights(model, targets)
    state = randomize(mem.init(dtype=torch.float64), scale=0.1)
    with torch.no_grad():
        for name in targets:
            reference.get_submodule(name).weight += state[f"{name}.delta"]
    with mem.bind(state):
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
        for name in targets:
            expected = model.get_submodule(name).weight + state[f"{name}.delta"]
            torch.testing.assert_close(mem.merged_weight(name, state), expected, rtol=0, atol=0)


def test_per_sample_state_equals_a_loop_over_samples():
    model = tiny_model(torch.float64)
    x = tokens(3, 5)
    mem = mm.FullFastWeights(model, mm.last_layers(model, 0.5))
    state = randomize(mem.init(batch_size=3, dtype=torch.float64), scale=0.1)
    with mem.bind(state):
        batched = model(x)
    for b in range(3):
        with mem.bind({k: v[b] for k, v in state.items()}):
            torch.testing.assert_close(batched[b : b + 1], model(x[b : b + 1]), rtol=1e-12, atol=0)


def delta_rule_setup(num_pairs=8, dim=16):
    keys, values = association_task(num_pairs, dim, seed=3)
    model = Associative(dim).double()
    mem = mm.FullFastWeights(model, ["proj"])

    def loss(memory, state):
        with memory.bind(state):
            return recall_loss(model(keys), values)

    return model, mem, loss, keys, values


def test_one_sgd_step_is_the_delta_rule():
    """grad of 0.5 mean_i ||(W + D) k_i - v_i||^2 is (1/N) sum_i (pred_i - v_i) k_i^T, so one
    step with rate lr is D + (lr/N) sum_i (v_i - (W + D) k_i) k_i^T (Schlag et al. 2021)."""
    model, mem, loss, keys, values = delta_rule_setup()
    state = randomize(mem.init(dtype=torch.float64), scale=0.05)
    lr = 1.7
    stepped = sgd_steps(mem, state, loss, lr=lr, steps=1)[-1]
    weight = model.proj.weight + state["proj.delta"]
    residual = values - keys @ weight.T  # (N, d): v_i - (W + D) k_i
    expected = state["proj.delta"] + lr / len(keys) * residual.T @ keys
    torch.testing.assert_close(stepped["proj.delta"], expected, rtol=1e-12, atol=1e-14)


def test_recall_loss_decays_geometrically_and_lr_n_writes_in_one_step():
    """With orthonormal keys each step scales every residual by (1 - lr/N), so the loss after
    k steps is (1 - lr/N)^(2k) times the first; with lr = N one step stores all N pairs."""
    model, mem, loss, keys, values = delta_rule_setup(num_pairs=8)
    state = mem.init(dtype=torch.float64)
    states = sgd_steps(mem, state, loss, lr=2.0, steps=6)
    losses = torch.stack([loss(mem, s) for s in states]).detach()
    expected = losses[0] * (1 - 2.0 / 8) ** (2 * torch.arange(7, dtype=torch.float64))
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=0)

    written = sgd_steps(mem, state, loss, lr=8.0, steps=1)[-1]
    with mem.bind(written):
        torch.testing.assert_close(model(keys), values, rtol=0, atol=1e-12)
        assert recall_accuracy(model(keys), values) == 1.0
    with mem.bind(state):
        assert recall_accuracy(model(keys), values) <= 0.25
