"""`bind(state, at_init=True)`: at `init`'s state (LoRA B = 0, full delta = 0) the correction is
skipped, and the output and every gradient equal the ordinary path's bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memory as mm
from tests.memory.helpers import tiny_model, tokens


def make_memory(kind: str, model, dropout: float = 0.0):
    targets = mm.last_layers(model, 0.5)
    if kind == "lora":
        return mm.FastLoRA(model, targets, rank=3, alpha=6.0, dropout=dropout)
    return mm.FullFastWeights(model, targets)


def loss_and_grads(model, mem, state, x, *, at_init: bool, seed: int = 5):
    """A loss that weighs every logit differently, and its gradient with respect to the state,
    the model's parameters and the input embeddings (through a hook on the embedding)."""
    leaves = {k: v.detach().requires_grad_() for k, v in state.items()}
    torch.manual_seed(seed)  # the LoRA dropout's draws
    with mem.bind(leaves, at_init=at_init):
        logits = model(x)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
    loss = (logits.sin() * weights).sum()
    inputs = [*leaves.values(), *model.parameters()]
    return logits, torch.autograd.grad(loss, inputs, allow_unused=False)


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_at_init_equals_the_ordinary_path_bit_for_bit(kind, per_sample, dtype):
    model = tiny_model(dtype=dtype)
    mem = make_memory(kind, model)
    x = tokens(3, 6)
    state = mem.init(
        batch_size=3 if per_sample else None, generator=torch.Generator().manual_seed(1)
    )
    out, grads = loss_and_grads(model, mem, state, x, at_init=False)
    fast_out, fast_grads = loss_and_grads(model, mem, state, x, at_init=True)
    assert torch.equal(out, fast_out)
    for ordinary, fast in zip(grads, fast_grads):
        assert torch.equal(ordinary, fast)
    # The check is not vacuous: B (or the full delta) gets a nonzero gradient, A exactly zero.
    for key, grad in zip(state, fast_grads):
        assert (grad.abs().sum() == 0) == key.endswith(".A")


def test_at_init_with_lora_dropout_draws_the_same_masks():
    model = tiny_model(dtype=torch.float64).train()
    mem = make_memory("lora", model, dropout=0.3)
    state = mem.init(generator=torch.Generator().manual_seed(2))
    _, grads = loss_and_grads(model, mem, state, tokens(2, 6), at_init=False)
    _, fast = loss_and_grads(model, mem, state, tokens(2, 6), at_init=True)
    assert all(torch.equal(a, b) for a, b in zip(grads, fast))
    _, other_seed = loss_and_grads(model, mem, state, tokens(2, 6), at_init=True, seed=6)
    assert not all(torch.equal(a, b) for a, b in zip(grads, other_seed))  # dropout is active


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_at_init_skips_the_corrections_products(kind):
    """Forward and backward with at_init run fewer matmuls: per LoRA target, B's product in the
    forward, and g B, A's gradient and x's gradient through A in the backward (only B's
    gradient, g^T (s A x), is left); per full target, the delta's product and x's gradient
    through it."""
    model = tiny_model(dtype=torch.float64)
    mem = make_memory(kind, model)
    state = mem.init(generator=torch.Generator().manual_seed(1))
    counts = {}
    for at_init in (False, True):
        with CountMatmuls() as counter:
            loss_and_grads(model, mem, state, tokens(2, 6), at_init=at_init)
        counts[at_init] = counter.count
    saved = {"lora": 4, "full": 2}[kind] * len(mem.targets)
    assert counts[False] - counts[True] == saved


def test_at_init_under_torch_func_takes_the_ordinary_path():
    model = tiny_model(dtype=torch.float64)
    mem = make_memory("lora", model)
    state = mem.init(generator=torch.Generator().manual_seed(1))
    x = tokens(2, 6)

    def loss(state, at_init):
        with mem.bind(state, at_init=at_init):
            return model(x).sin().sum()

    ordinary = torch.func.grad(loss)(state, False)
    fast = torch.func.grad(loss)(state, True)
    assert all(torch.equal(ordinary[k], fast[k]) for k in state)


def test_at_init_is_first_order_only():
    model = tiny_model(dtype=torch.float64)
    mem = make_memory("lora", model)
    state = {k: v.requires_grad_() for k, v in mem.init().items()}
    with mem.bind(state, at_init=True):
        loss = model(tokens(2, 6)).sin().sum()
    # An unrolled inner loop differentiates these gradients again: asking for a graph raises
    # instead of silently dropping the second-order terms.
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(loss, list(state.values()), create_graph=True)


def test_at_init_must_be_a_bool():
    model = tiny_model()
    mem = make_memory("lora", model)
    with pytest.raises(TypeError, match="at_init must be True or False"):
        mem.bind(mem.init(), at_init=1)
