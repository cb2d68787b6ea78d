"""The Triton row kernel of `linear_ce.py`: cross-entropy per row and, in place, its gradient.

One program per row of a (C, V) logits chunk, in two sweeps over the vocabulary in blocks of
BLOCK_V columns:

    sweep 1 (online logsumexp, Milakov & Gimelshein 2018):  m <- max(m, max_block z),
             s <- s * exp(m_old - m) + sum_block exp(z - m);   lse = m + log s,
             CE = lse - z_y;
    sweep 2 (only with WRITE_GRAD):  z_v <- w (exp(z_v - lse) - [v = y]).

Loads are cast to float32 right after `tl.load` (Triton's interpreter mishandles bf16
arithmetic), all arithmetic is float32, and the gradient is stored in the logits' dtype. The
kernel is defined on first use, so TRITON_INTERPRET may be set any time before that.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["triton_rows"]


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def cross_entropy_rows(
        logits_ptr,
        row_stride,
        targets_ptr,
        row_weight_ptr,
        ce_ptr,
        n_cols,
        WRITE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(z - new_max), axis=0
            )
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target_logit = tl.load(base + target).to(tl.float32)
        tl.store(ce_ptr + row, lse - target_logit)
        if WRITE_GRAD:
            weight = tl.load(row_weight_ptr + row).to(tl.float32)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                valid = cols < n_cols
                z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
                grad = weight * (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0))
                tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=valid)

    return cross_entropy_rows


def _launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a whole small vocabulary per block, 8192-column blocks beyond."""
    block = min(8192, 1 << max(0, (vocab - 1).bit_length()))
    warps = 16 if block >= 4096 else 8 if block >= 1024 else 4
    return block, warps


def triton_rows(
    logits: Tensor,
    targets: Tensor,
    row_weight: Tensor,
    with_grad: bool,
    *,
    block_v: int | None = None,
) -> Tensor:
    """Same contract as `linear_ce.reference_rows`; the CE is computed in float32.

    block_v: columns per block (a power of two >= 16); None = `_launch_config`'s choice. Tests
    use small blocks to exercise the online logsumexp across blocks.
    """
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "the chunk is a fresh matmul output, hence row-major"
    ce = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return ce
    block, warps = _launch_config(vocab)
    block = block_v or block
    _kernel()[(rows,)](
        logits,
        logits.stride(0),
        targets.contiguous(),
        row_weight.to(torch.float32).contiguous(),
        ce,
        vocab,
        WRITE_GRAD=with_grad,
        BLOCK_V=block,
        num_warps=warps,
    )
    return ce
