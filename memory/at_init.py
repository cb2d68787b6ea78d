"""The correction at a freshly initialised state, where it is exactly zero (`bind(at_init=True)`).

`init` starts LoRA at B = 0 and full fast weights at delta = 0, so at that state a target
computes y = W x + b + 0. The first inner step of a fast-weight loop is taken there, and the
ordinary path pays for a correction that adds nothing. With g = dL/dy at a target:

    LoRA, y = W x + s B (A x):   dL/dB = s g^T (A x)   (the only gradient that is not zero)
                                 dL/dA = s (B^T g)^T x = 0,  x's share, s A^T B^T g = 0
    full, y = W x + D x:         dL/dD = g^T x,               x's share, D^T g = 0

`AtInit` below returns `output` itself in the forward pass and only the nonzero gradient in
the backward pass: B's forward product, the addition, g B, and A's and x's gradients through the
correction are skipped (A gets exact zeros). That gradient is computed with the same operation,
on the same layout, as autograd's backward of the ordinary path (`F.linear`'s mm,
`batched_linear`'s bmm), so the values are the ordinary path's bit for bit on the same device
(for contiguous state tensors, as `init` and an SGD step make them; autograd takes another
product order for a transposed one, equal to rounding). The backward pass is not
differentiable again: a backward with `create_graph=True` (an unrolled or second-order inner
loop) raises instead of dropping the second-order terms.
"""

from __future__ import annotations

import torch
from torch import Tensor


def plain_autograd() -> bool:
    """True in eager autograd: not while `torch.compile` traces, not inside a `torch.func`
    transform, where the ordinary path runs (`AtInit` defines no vmap or jvp rule: it is
    written in the ctx-first style, whose `apply` skips the signature binding that a
    `setup_context` function pays on every call)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is None


def first_order_only() -> None:
    """Raise in a backward pass that builds a graph (`create_graph=True`): the gradients below
    are correct only to first order (at B = 0 the second derivatives are not zero)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "bind(state, at_init=True) is first-order only: its gradients cannot be "
            "differentiated again (create_graph=True, an unrolled or second-order inner loop); "
            "bind without at_init there"
        )


def weight_grad(grad: Tensor, rows: Tensor, batched: bool) -> Tensor:
    """The gradient of `F.linear(rows, w)` (batched: `batched_linear(rows, w)`) with respect to
    w, as autograd's backward computes it: (out, in), or (B, out, in).

    grad: (..., out) the gradient at the output; rows: (..., in) the input, same leading dims.
    """
    if not batched:  # mm's backward for a transposed mat2: grad^T mm rows
        return grad.reshape(-1, grad.shape[-1]).t().mm(rows.reshape(-1, rows.shape[-1]))
    flat_grad = grad.reshape(grad.shape[0], -1, grad.shape[-1])
    flat_rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])
    return flat_rows.transpose(1, 2).bmm(flat_grad).transpose(1, 2)  # bmm's backward for mat2


class AtInit(torch.autograd.Function):
    """`output + correction` at init, where the correction is zero: the value is `output`.

    `AtInit.apply(output, rows, weight, *zeros)`: the correction's last product is
    `F.linear(rows, weight)` (LoRA: rows = s A x made without a graph, weight = B; full: rows = x,
    weight = delta). Gradients: output's passed through, weight's = `weight_grad(g, rows)`,
    exact zeros for each of `zeros` (LoRA's A), none to rows (its share is zero at init).
    """

    @staticmethod
    def forward(ctx, output: Tensor, rows: Tensor, weight: Tensor, *zeros: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.batched = weight.dim() == 3
        ctx.zeros_like = [(z.shape, z.dtype, z.device) for z in zeros]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        first_order_only()
        (rows,) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_weight = weight_grad(grad, rows, ctx.batched) if needs[2] else None
        zeros = [
            torch.zeros(shape, dtype=dtype, device=device) if need else None
            for (shape, dtype, device), need in zip(ctx.zeros_like, needs[3:])
        ]
        return (grad, None, grad_weight, *zeros)
