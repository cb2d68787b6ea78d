"""Fused output projection + weighted cross-entropy, chunked over rows (Liger / Cut-Cross-Entropy).

For rows h_i (N, D), an output projection W (V, D), targets y_i and row weights w_i:

    loss = sum_i w_i * CE_i,   CE_i = logsumexp_v z_iv - z_{i, y_i},   z_i = W h_i   (V,)

with the gradients (p_i = softmax(z_i), e_y the one-hot vector of y):

    d loss / d h_i = w_i (p_i - e_{y_i}) W,
    d loss / d W   = sum_i w_i (p_i - e_{y_i})^T h_i,
    d loss / d w_i = CE_i.

The rows are processed in chunks of C. For each chunk the logits (C, V) are formed in the compute
dtype, a row kernel turns them into CE_i and, in place, into w_i (p_i - e_{y_i}), and two matmuls
fold that into the gradients. The gradients are thus computed during the forward pass (Liger's
fused linear cross-entropy), and the backward pass only scales them by the incoming gradient. Peak
extra memory is one (C, V) chunk plus a float32 (V, D) accumulator, instead of the (N, V) logits,
their float32 copy and their softmax. The result is not differentiable twice.

The row kernel is the Triton kernel of `triton_ce.py` or `reference_rows` below; both have the
same contract, so the chunking, the matmuls and the autograd plumbing are shared.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_int, debug_checks_enabled
from .dispatch import resolve_backend

__all__ = ["default_chunk_rows", "linear_cross_entropy", "reference_rows"]

# (logits (C, V), targets (C,), row_weight (C,), with_grad) -> CE (C,), logits overwritten in
# place with w_i (p_i - e_{y_i}) when with_grad.
RowKernel = Callable[[Tensor, Tensor, Tensor, bool], Tensor]


def reference_rows(logits: Tensor, targets: Tensor, row_weight: Tensor, with_grad: bool) -> Tensor:
    """The row kernel in PyTorch: CE per row in float32 (float64 for float64 logits).

    Args:
        logits: (C, V) one chunk's logits; overwritten with w_i (p_i - e_{y_i}) if `with_grad`.
        targets: (C,) integer targets in [0, V).
        row_weight: (C,) float weights w_i.
        with_grad: also write the logits' gradient.

    Returns:
        (C,) cross-entropies.
    """
    acc_dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(acc_dtype)  # the chunk itself when it is already float32
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(-1, targets[:, None]).squeeze(-1)
    if not with_grad:
        return ce
    # In place on z: the chunk itself for float32 logits, else its upcast copy.
    grad = z.sub_(lse[:, None]).exp_()  # softmax
    grad.scatter_add_(-1, targets[:, None], -torch.ones_like(grad[:, :1]))
    grad.mul_(row_weight.to(acc_dtype)[:, None])
    if grad is not logits:
        logits.copy_(grad)
    return ce


def default_chunk_rows(rows: int, vocab: int, dim: int, *, min_rows: int = 128) -> int:
    """Rows per chunk: Liger's C = next_pow2(ceil(N / ceil(V / D))), so that a chunk's logits
    (C, V) are about as large as the rows (N, D), but at least `min_rows` (or N).

    The floor matters for small N and large V/D: every chunk reads and writes the whole (V, D)
    weight-gradient accumulator, which dominates once chunks have fewer rows than about 128
    (CPU) or 1024 (GPU, the default there) -- the arithmetic intensity of that update is C / 4
    flops per byte in float32.
    """
    if rows <= 1:
        return 1
    chunks = max(1, math.ceil(vocab / dim))
    liger = 1 << max(0, math.ceil(math.log2(math.ceil(rows / chunks))))
    return min(rows, max(liger, min_rows))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i w_i CE_i with gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(
        hidden, weight, targets, row_weight, chunk_rows, row_kernel, with_grad, weight_grad
    ):
        # weight_grad False (a constant weight, e.g. a first-order inner loss): the (V, D)
        # weight-gradient product, a third of the chunk's work, is skipped.
        rows = hidden.shape[0]
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        ce = torch.empty(rows, dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else hidden.new_empty(0)
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
            if with_grad and weight_grad
            else weight.new_empty(0, dtype=acc_dtype)
        )
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            h = hidden[start:stop]
            logits = h @ weight.t()  # (C, V) in the compute dtype
            ce[start:stop] = row_kernel(
                logits, targets[start:stop], row_weight[start:stop], with_grad
            )
            if with_grad:  # logits now holds d loss / d logits
                grad_hidden[start:stop] = logits @ weight
                if weight_grad:
                    _accumulate(grad_weight, logits.t(), h)
        loss = (ce * row_weight.to(acc_dtype)).sum()
        return loss, ce, grad_hidden, grad_weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, _, row_weight, _, _, with_grad, weight_grad = inputs
        _, ce, grad_hidden, grad_weight = output
        ctx.mark_non_differentiable(ce, grad_hidden, grad_weight)
        ctx.save_for_backward(ce, grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype, row_weight.dtype)
        ctx.computed = (with_grad, with_grad and weight_grad)  # which gradients exist

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *unused):
        ce, grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype, row_weight_dtype = ctx.dtypes
        needs = ctx.needs_input_grad
        if (needs[0] and not ctx.computed[0]) or (needs[1] and not ctx.computed[1]):
            raise RuntimeError(
                "linear_cross_entropy: gradients were not computed in the forward pass "
                "(it ran with grad disabled or with inputs that did not require grad)"
            )
        return (
            (grad_hidden * grad_loss).to(hidden_dtype) if needs[0] else None,
            _scaled(grad_weight, grad_loss, weight_dtype) if needs[1] else None,
            None,
            (ce * grad_loss).to(row_weight_dtype) if needs[3] else None,
            None,
            None,
            None,
            None,
        )


def _scaled(grad: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """grad * scale in `dtype` with one allocation; the saved `grad` is never modified, so the
    graph may be differentiated again (retain_graph)."""
    if grad.dtype == dtype:
        return grad * scale
    return grad.to(dtype).mul_(scale.to(dtype))


# Devices on which acc += a @ b is first tried as one addmm(out_dtype=float32) into acc.
FUSED_ACCUMULATE_DEVICES = {"cuda"}
_fused_unsupported: set[str] = set()  # device types where this torch build lacks it (warned once)


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in one cuBLAS call that accumulates into the float32 buffer."""
    torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def _unsupported_out_dtype(error: Exception) -> bool:
    """Whether `error` says only that addmm(out_dtype=...) is missing from this torch build or
    backend, or does not take these dtypes: an old torch without the overload (TypeError), no
    kernel for `aten::addmm.dtype_out` on the device (NotImplementedError), or a dtype check
    that names `out_dtype`. An out-of-memory error or any other failure is not."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    text = str(error)
    if isinstance(error, TypeError):
        return "out_dtype" in text or "invalid combination of arguments" in text
    if isinstance(error, NotImplementedError):
        return "addmm.dtype_out" in text
    return isinstance(error, RuntimeError) and "out_dtype" in text


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, in place, with acc in float32/float64 and a, b maybe bf16/fp16.

    Where the device allows it, cuBLAS accumulates into the float32 buffer directly (no (V, D)
    temporary). Where this torch build cannot (`_unsupported_out_dtype`), a warning says so
    once per device type and the half-precision product is added instead; any other error,
    an out-of-memory one included, propagates.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    device = acc.device.type
    if (
        device in FUSED_ACCUMULATE_DEVICES
        and device not in _fused_unsupported
        and not torch.compiler.is_compiling()
    ):
        try:
            _addmm_into(acc, a, b)
            return
        except (RuntimeError, TypeError) as error:
            if not _unsupported_out_dtype(error):
                raise
            _fused_unsupported.add(device)
            warnings.warn(
                f"linear_cross_entropy: torch {torch.__version__} cannot accumulate a "
                f"{a.dtype} matmul into a {acc.dtype} buffer on {device} "
                f"(addmm out_dtype: {type(error).__name__}: {str(error).splitlines()[0][:160]}); "
                "adding the half-precision product instead, which needs one more "
                "(V, D) temporary per chunk, for the rest of this process",
                RuntimeWarning,
                stacklevel=2,
            )
    acc.add_(a @ b)  # a half-precision (V, D) product, then a float32 in-place add


def _row_kernel(backend: str) -> RowKernel:
    if backend == "triton":
        from .triton_ce import triton_rows

        return triton_rows
    return reference_rows


def _min_rows(hidden: Tensor) -> int:
    return 1024 if hidden.device.type == "cuda" else 128


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The autocast dtype inside an autocast region, else the promoted input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    row_weight: Tensor | None = None,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """sum_i w_i * CE(W h_i, y_i) without materialising the (N, V) logits (module docstring).

    Args:
        hidden: (N, D) rows, e.g. the final-norm hidden states of the masked positions.
        weight: (V, D) output projection (`lm_head.weight`; no bias).
        targets: (N,) integer targets in [0, V).
        row_weight: (N,) float weights w_i (None = ones); differentiable.
        backend: "auto", "reference" or "triton" (`diffusion.kernels.dispatch`).
        chunk_size: rows per chunk; None = `default_chunk_rows(N, V, D)` with a floor of 1024
            rows on CUDA and 128 elsewhere.

    Returns:
        A 0-d tensor in float32 (float64 for float64 inputs). Under autocast the matmuls run in
        the autocast dtype and the softmax in float32.
    """
    fn = "linear_cross_entropy"
    _check_inputs(fn, hidden, weight, targets, row_weight)
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    if chunk_size is not None:
        check_int(fn, "chunk_size", chunk_size, minimum=1)
    if row_weight is None:
        row_weight = torch.ones(rows, dtype=torch.float32, device=hidden.device)
    if debug_checks_enabled() and targets.numel():  # a host read: opt-in (dd.debug_checks)
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"{fn}: targets must lie in [0, {vocab}) (the rows of weight), got values in "
                f"[{low}, {high}]"
            )
    kernel = _row_kernel(resolve_backend(backend, hidden.device, fn=fn))
    dtype = _compute_dtype(hidden, weight)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        loss, *_ = _ChunkedLinearCrossEntropy.apply(
            hidden.to(dtype),
            weight.to(dtype),
            targets.long(),
            row_weight,
            chunk_size or default_chunk_rows(rows, vocab, dim, min_rows=_min_rows(hidden)),
            kernel,
            with_grad,
            weight.requires_grad,
        )
    return loss


def _check_inputs(fn, hidden, weight, targets, row_weight) -> None:
    for name, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, Tensor) or value.dim() != 2 or not value.is_floating_point():
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{fn}: {name} must be a 2-D float tensor, got {got}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: hidden (N, D) and weight (V, D) must share D, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    rows = hidden.shape[0]
    if (
        not isinstance(targets, Tensor)
        or targets.shape != (rows,)
        or targets.is_floating_point()
        or targets.dtype == torch.bool
    ):
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"{fn}: targets must be an integer tensor of shape ({rows},), got {got}")
    if row_weight is not None and (
        not isinstance(row_weight, Tensor)
        or row_weight.shape != (rows,)
        or not row_weight.is_floating_point()
    ):
        got = tuple(row_weight.shape) if isinstance(row_weight, Tensor) else type(row_weight)
        raise ValueError(f"{fn}: row_weight must be a float tensor of shape ({rows},), got {got}")
    devices = {hidden.device, weight.device, targets.device}
    if row_weight is not None:
        devices.add(row_weight.device)
    if len(devices) > 1:
        raise ValueError(f"{fn}: all inputs must be on one device, got {sorted(map(str, devices))}")
