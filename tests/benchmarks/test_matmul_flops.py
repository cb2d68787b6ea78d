"""The step benchmarks' FLOP counter (`benchmarks/bench_memdlm_step.py:MatmulFlops`) counts the
closed-form FLOPs of matmuls and attention, forward and backward, and leaves module hooks alone
(so that `mm.output_of` keeps its shared path while counting)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import memory as mm
from benchmarks.bench_memdlm_step import MatmulFlops


def test_matmuls_count_two_flops_per_multiply_add_forward_and_backward():
    m, k, n = 6, 5, 7
    x = torch.randn(2, m, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    with MatmulFlops() as forward:
        y = F.linear(x, w)  # (2 m) x k by k x n
    assert forward.total == 2 * (2 * m) * k * n
    with MatmulFlops() as backward:
        y.sum().backward()  # the input's and the weight's gradient: one product each
    assert backward.total == 2 * forward.total
    with MatmulFlops() as batched:
        torch.bmm(torch.randn(3, m, k), torch.randn(3, k, n))
    assert batched.total == 3 * 2 * m * k * n
    with MatmulFlops() as elementwise:
        (x * 2).exp().sum()
    assert elementwise.total == 0


def test_attention_counts_its_two_products_and_five_in_backward():
    b, h, length, d = 2, 3, 8, 4
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    mask = torch.zeros(b, 1, length, length)  # as the HF backbone passes it
    with MatmulFlops() as counter:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    product = 2 * b * h * length * length * d
    assert counter.total == 2 * product  # q k^T, then p v
    with MatmulFlops() as backward:
        out.sum().backward()
    assert backward.total == 5 * product  # the scores again, dP, dV, dQ, dK


def test_no_module_hooks_are_installed():
    model = nn.Sequential(nn.Linear(4, 4))
    mem = mm.FastLoRA(model, ["0"], rank=2, alpha=2.0)
    with MatmulFlops():
        assert mm.only_fast_weights(model[0])  # FlopCounterMode's global hooks would not be
    mem.remove()
