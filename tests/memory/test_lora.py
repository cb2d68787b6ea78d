"""FastLoRA: init distribution, W x + (alpha/rank) B A dropout(x) by hand, per-sample batching,
and an inner SGD loop that stores key-value associations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


def test_init_shapes_dtype_and_zero_b():
    model = tiny_model(dtype=torch.float64)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=5, alpha=10.0)
    assert mem.scale == 2.0
    state = mem.init()
    assert set(state) == {f"{t}.{s}" for t in mem.targets for s in ("A", "B")}
    for name in mem.targets:
        linear = model.get_submodule(name)
        assert state[f"{name}.A"].shape == (5, linear.in_features)
        assert state[f"{name}.B"].shape == (linear.out_features, 5)
        assert torch.count_nonzero(state[f"{name}.B"]) == 0
    # the weight dtype promoted to at least float32 by default: float64 here; dtype= wins
    assert all(t.dtype == torch.float64 for t in state.values())
    assert mem.init(dtype=torch.float32)[f"{name}.A"].dtype == torch.float32
    batched = mem.init(batch_size=3)
    assert batched[f"{name}.A"].shape == (3, 5, linear.in_features)
    assert batched[f"{name}.B"].shape == (3, linear.out_features, 5)
    assert not torch.equal(batched[f"{name}.A"][0], batched[f"{name}.A"][1])  # independent draws


def test_init_a_is_kaiming_uniform_a_sqrt5():
    """kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)): KS test at level 1e-3."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 8))
    mem = mm.FastLoRA(model, ["0"], rank=32)
    a = mem.init(generator=torch.Generator().manual_seed(7))["0.A"].double().flatten()
    bound = 1.0 / math.sqrt(256)
    assert a.abs().max() <= bound
    u = ((a + bound) / (2 * bound)).sort().values  # should be U(0, 1)
    n = u.numel()
    empirical_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(empirical_hi - u, u - (empirical_hi - 1.0 / n)).max().item()
    assert ks < 1.949 / math.sqrt(n), f"KS statistic {ks:.4f} rejects U(-1/sqrt(in), 1/sqrt(in))"


def test_init_is_reproducible_with_a_generator():
    model = tiny_model()
    mem = mm.FastLoRA(model, mm.last_layers(model), rank=4)
    first = mem.init(generator=torch.Generator().manual_seed(3))
    second = mem.init(generator=torch.Generator().manual_seed(3))
    other = mem.init(generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_init_rejects_bad_arguments():
    model = tiny_model()
    mem = mm.FastLoRA(model, mm.last_layers(model), rank=4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            mem.init(batch_size=bad)
    with pytest.raises(TypeError, match="dtype"):
        mem.init(dtype=torch.int64)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_init_state_leaves_outputs_bit_identical(batch_size):
    model = tiny_model()
    x = tokens(3, 6)
    bare = model(x)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=4, alpha=8.0)
    with mem.bind(mem.init(batch_size=batch_size)):
        assert torch.equal(model(x), bare)


def merged_by_hand(model, state, scale):
    """A copy of each target's weight replaced by W + scale * B @ A (float64)."""
    for key in state:
        if key.endswith(".A"):
            name = key[: -len(".A")]
            weight = model.get_submodule(name).weight
            with torch.no_grad():
                weight += scale * state[f"{name}.B"] @ state[f"{name}.A"]
    return model


def test_bound_state_equals_the_merged_weight_computed_by_hand():
    model, reference = tiny_model(torch.float64), tiny_model(torch.float64)
    x = tokens(2, 5)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=3, alpha=7.0)
    state = randomize(mem.init(dtype=torch.float64))
    with mem.bind(state):
        bound = model(x)
    expected = merged_by_hand(reference, state, 7.0 / 3)(x)
    torch.testing.assert_close(bound, expected, rtol=1e-12, atol=1e-12)
    assert (bound - model(x)).abs().max() > 1e-3  # the state really changes the output


def test_merged_weight_matches_the_formula_shared_and_per_sample():
    model = tiny_model(torch.float64)
    mem = mm.FastLoRA(model, ["layers.1.mlp.up_proj"], rank=2, alpha=3.0)
    for batch_size in (None, 4):
        state = randomize(mem.init(batch_size=batch_size, dtype=torch.float64))
        a, b = state["layers.1.mlp.up_proj.A"], state["layers.1.mlp.up_proj.B"]
        expected = model.layers[1].mlp.up_proj.weight + 1.5 * torch.matmul(b, a)
        got = mem.merged_weight("layers.1.mlp.up_proj", state)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown target 'lm_head'"):
        mem.merged_weight("lm_head", state)


def test_per_sample_state_equals_a_loop_over_samples():
    model = tiny_model(torch.float64)
    x = tokens(3, 5)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=4, alpha=8.0)
    state = randomize(mem.init(batch_size=3, dtype=torch.float64))
    with mem.bind(state):
        batched = model(x)
    for b in range(3):
        with mem.bind({k: v[b] for k, v in state.items()}):
            torch.testing.assert_close(batched[b : b + 1], model(x[b : b + 1]), rtol=1e-12, atol=0)


def test_per_sample_state_with_equal_samples_equals_the_shared_state():
    model = tiny_model(torch.float64)
    x = tokens(3, 5)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=4)
    shared = randomize(mem.init(dtype=torch.float64))
    with mem.bind({k: v.expand(3, *v.shape) for k, v in shared.items()}):
        per_sample = model(x)
    with mem.bind(shared):
        torch.testing.assert_close(per_sample, model(x), rtol=1e-12, atol=1e-14)


def test_changing_one_sample_state_leaves_the_others_bit_identical():
    model = tiny_model()
    x = tokens(3, 5)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=4)
    state = randomize(mem.init(batch_size=3))
    with mem.bind(state):
        before = model(x)
    perturbed = {k: v.clone() for k, v in state.items()}
    for v in perturbed.values():
        v[1] += 1.0
    with mem.bind(perturbed):
        after = model(x)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


def test_dropout_applies_to_the_lora_branch_only_and_only_in_training():
    model = Associative(8).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    mem = mm.FastLoRA(model, ["proj"], rank=2, alpha=4.0, dropout=0.5)
    state = randomize(mem.init(dtype=torch.float64))
    a, b, weight = state["proj.A"], state["proj.B"], model.proj.weight
    model.train()
    torch.manual_seed(11)
    with mem.bind(state):
        got = model(x)
    torch.manual_seed(11)
    dropped = F.dropout(x, 0.5, training=True)
    expected = x @ weight.T + 2.0 * (dropped @ a.T) @ b.T
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    model.eval()
    with mem.bind(state):
        torch.testing.assert_close(model(x), x @ mem.merged_weight("proj", state).T)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.0}, ValueError, "rank"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": float("inf")}, ValueError, "alpha"),
        ({"alpha": "64"}, TypeError, "alpha"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"dropout": None}, TypeError, "dropout"),
    ],
)
def test_constructor_rejects_bad_hyperparameters(kwargs, error, match):
    model = tiny_model()
    with pytest.raises(error, match=match):
        mm.FastLoRA(model, ["lm_head"], **kwargs)


# ------------------------------------------------------------------ key-value association
def association_loss(model, keys, values):
    def loss(memory, state):
        with memory.bind(state):
            return recall_loss(model(keys), values)

    return loss


def make_associative(dim, rank, batch_size=None):
    model = Associative(dim).double()
    mem = mm.FastLoRA(model, ["proj"], rank=rank, alpha=float(rank))
    state = mem.init(batch_size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return model, mem, state


def test_inner_sgd_stores_key_value_associations():
    """N = 8 orthonormal keys, rank 8: one step lowers the recall loss, every step lowers it
    further, and nearest-value retrieval goes from chance to perfect."""
    keys, values = association_task(num_pairs=8, dim=16)
    model, mem, state = make_associative(dim=16, rank=8)
    loss = association_loss(model, keys, values)
    states = sgd_steps(mem, state, loss, lr=4.0, steps=20)
    losses = [loss(mem, s).item() for s in states]
    assert losses[1] < losses[0]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 1e-4 * losses[0]
    accuracy = []
    for s in states:
        with mem.bind(s):
            accuracy.append(recall_accuracy(model(keys), values))
    assert accuracy[0] <= 0.25  # the random base weight does not store the pairs
    assert accuracy[10] == accuracy[-1] == 1.0


def test_per_sample_memories_store_each_sample_own_associations():
    """Three samples with different key-value sets and one batched inner loop: each sample's
    memory retrieves its own pairs, and not the pairs another sample stored."""
    keys, values = association_task(num_pairs=6, dim=16, batch=3, seed=1)
    model, mem, state = make_associative(dim=16, rank=6, batch_size=3)
    final = sgd_steps(mem, state, association_loss(model, keys, values), lr=4.0, steps=20)[-1]
    with mem.bind(final):
        own = [recall_accuracy(model(keys)[b], values[b]) for b in range(3)]
        other_keys, other_values = keys.roll(1, 0), values.roll(1, 0)  # sample b-1's pairs
        crossed = [recall_accuracy(model(other_keys)[b], other_values[b]) for b in range(3)]
    assert own == [1.0, 1.0, 1.0]
    assert sum(crossed) / 3 < 0.5  # chance is 1/6
