"""`mm.output_of(linear, x, output)`: a target's output under the open bindings from its own
product computed elsewhere, so that forwards under different states can share that product.
Equal to calling the module, in value and in every gradient, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memory as mm


def linear_and_memory(kind: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7)).to(dtype)
    if kind == "lora":
        mem = mm.FastLoRA(model, ["0"], rank=3, alpha=6.0)
    else:
        mem = mm.FullFastWeights(model, ["0"])
    return model[0], mem


def moved(state):
    """A state away from init (B or delta nonzero), so that the correction is not zero."""
    generator = torch.Generator().manual_seed(3)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in state.items()}


def output_and_grads(linear, mem, state, x, *, shared_product: bool, at_init=False):
    leaves = {k: v.detach().requires_grad_() for k, v in state.items()}
    x = x.detach().requires_grad_()
    with mem.bind(leaves, at_init=at_init):
        if shared_product:
            y = mm.output_of(linear, x, F.linear(x, linear.weight, linear.bias))
        else:
            y = linear(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    inputs = [x, linear.weight, linear.bias, *leaves.values()]
    return y, torch.autograd.grad((y.sin() * weights).sum(), inputs)


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_of_equals_the_modules_call_bit_for_bit(kind, per_sample, dtype):
    linear, mem = linear_and_memory(kind, dtype)
    batch = 4 if per_sample else None
    state = moved(mem.init(batch_size=batch, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(4, 6, 5, dtype=dtype, generator=torch.Generator().manual_seed(2))
    y, grads = output_and_grads(linear, mem, state, x, shared_product=False)
    y_shared, grads_shared = output_and_grads(linear, mem, state, x, shared_product=True)
    assert torch.equal(y, y_shared)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_shared))
    assert not torch.equal(y, F.linear(x, linear.weight, linear.bias))  # the correction is on


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_output_of_at_init_and_unbound(kind):
    """At init (`bind(at_init=True)`) as the module's call computes it; outside every binding,
    the given output itself (the same object: nothing added)."""
    linear, mem = linear_and_memory(kind)
    state = mem.init(generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, grads = output_and_grads(linear, mem, state, x, shared_product=False, at_init=True)
    y_shared, grads_shared = output_and_grads(
        linear, mem, state, x, shared_product=True, at_init=True
    )
    assert torch.equal(y, y_shared)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_shared))
    product = F.linear(x, linear.weight, linear.bias)
    assert mm.output_of(linear, x, product) is product


def test_a_linear_with_other_hooks_is_called_so_that_they_run():
    """Another hook on the linear (its own, or a global module hook) must see the call:
    output_of then calls the module and ignores `output`, so the value is the module call's
    with the hook applied."""
    linear, mem = linear_and_memory("lora")
    plain = nn.Linear(5, 7)
    assert mm.only_fast_weights(linear) and mm.only_fast_weights(plain)
    x = torch.randn(2, 5, dtype=torch.float64)
    plain = plain.double()
    product = F.linear(x, plain.weight, plain.bias)
    handle = plain.register_forward_hook(lambda module, args, output: output * 2)
    assert not mm.only_fast_weights(plain)
    unused = torch.full_like(product, float("nan"))
    assert torch.equal(mm.output_of(plain, x, unused), 2 * product)
    handle.remove()
    handle = linear.register_forward_pre_hook(lambda module, args: None)
    assert not mm.only_fast_weights(linear)
    handle.remove()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(module)
    )
    try:
        assert not mm.only_fast_weights(linear)  # a global hook would be skipped too
        with mem.bind(moved(mem.init(generator=torch.Generator().manual_seed(1)))):
            expected = linear(x)
            seen.clear()
            got = mm.output_of(linear, x, torch.full_like(expected, float("nan")))
        assert seen == [linear]
        assert torch.equal(got, expected)
    finally:
        handle.remove()
    assert mm.only_fast_weights(linear)
    mem.remove()
    assert mm.only_fast_weights(linear)  # no hooks at all
