"""The fused sampler-step kernel: proposal and confidence of each candidate row in one sweep.

One program per candidate row reads the row's logits once, in blocks of BLOCK_V columns, straight
from the model output (a row index list, no gather copy), and keeps running statistics in
registers (m: running max; all sums are relative to it and rescaled when it grows):

    z = sum_v exp(s_v - m)                              (softmax normaliser)
    S = sum_v exp(s_v - m) (s_v - m)                    (entropy: sum p log p = S / z - log z)
    top-1 value and index, top-2 value                  (argmax, margin)
    best of s_v / T + G_v, its index and its score      (Gumbel-max, T > 0)

with s_v = logit_v in float32 and s_mask = -inf. The Gumbel noise is float64: two 32-bit Philox
outputs at offset (row * V + v) make a 53-bit uniform U in (0, 1), G = -log(-log U). The seed is
drawn from the caller's torch.Generator, so runs are reproducible. Loads are cast to float32 right
after `tl.load` (Triton's interpreter mishandles bf16 arithmetic).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .sampler import Proposal, random_confidence

__all__ = ["propose_triton"]

_MODES = {"low_confidence": 0, "margin": 1, "entropy": 2, "random": 3}
_SEED_BOUND = 2**31 - 1


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def propose_rows(
        logits_ptr,
        stride_b,
        stride_l,
        block_length,
        rows_ptr,
        token_ptr,
        confidence_ptr,
        lse_ptr,
        n_cols,
        mask_id,
        inv_temperature,
        seed,
        SAMPLE: tl.constexpr,
        MODE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = tl.load(rows_ptr + pid)  # flat index b * Lb + l of the candidate
        base = logits_ptr + (row // block_length) * stride_b + (row % block_length) * stride_l
        run_max = -float("inf")
        run_sum = 0.0
        run_entropy = 0.0
        second = -float("inf")
        best = 0
        noisy_best = tl.full((), float("-inf"), tl.float64)
        noisy_index = 0
        noisy_score = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = (cols < n_cols) & (cols != mask_id)
            s = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            s = tl.where(valid, s, -float("inf"))
            block_max = tl.max(s, axis=0)
            block_arg = tl.argmax(s, axis=0) + start
            if MODE == 1:  # the block's runner-up, then the running top-2
                block_second = tl.max(tl.where(cols == block_arg, -float("inf"), s), axis=0)
                second = tl.maximum(
                    tl.maximum(second, block_second), tl.minimum(run_max, block_max)
                )
            best = tl.where(block_max > run_max, block_arg, best)  # strict: first index wins
            new_max = tl.maximum(run_max, block_max)
            # -inf logits (excluded or impossible tokens) contribute nothing. Nothing is
            # accumulated while the running max is still -inf, so the differences below are
            # taken against finite values only (no inf - inf).
            live = s > -float("inf")
            gap = tl.where(run_sum > 0, run_max - new_max, 0.0)
            rescale = tl.exp(gap)
            diff = s - tl.where(new_max > -float("inf"), new_max, 0.0)
            e = tl.exp(diff)
            if MODE == 2:
                shifted = tl.sum(e * tl.where(live, diff, 0.0), axis=0)
                run_entropy = rescale * (run_entropy + gap * run_sum) + shifted
            run_sum = run_sum * rescale + tl.sum(e, axis=0)
            run_max = new_max
            if SAMPLE:
                offsets = row * n_cols + cols
                hi, lo, _, _ = tl.randint4x(seed, offsets)
                u = ((hi >> 5).to(tl.float64) * 67108864.0 + (lo >> 6).to(tl.float64) + 0.5) * (
                    1.0 / 9007199254740992.0
                )
                noisy = s.to(tl.float64) * inv_temperature - tl.log(-tl.log(u))
                noisy = tl.where(valid, noisy, -float("inf"))
                block_noisy = tl.max(noisy, axis=0)
                block_noisy_arg = tl.argmax(noisy, axis=0) + start
                block_noisy_score = tl.sum(tl.where(cols == block_noisy_arg, s, 0.0), axis=0)
                take = block_noisy > noisy_best
                noisy_index = tl.where(take, block_noisy_arg, noisy_index)
                noisy_score = tl.where(take, block_noisy_score, noisy_score)
                noisy_best = tl.maximum(noisy_best, block_noisy)
        if SAMPLE:
            token = noisy_index
            token_score = noisy_score
        else:
            token = best
            token_score = run_max
        if MODE == 0:
            confidence = tl.exp(token_score - run_max) / run_sum
        elif MODE == 1:
            confidence = (1.0 - tl.exp(second - run_max)) / run_sum
        elif MODE == 2:
            confidence = run_entropy / run_sum - tl.log(run_sum)
        else:
            confidence = 0.0
        tl.store(token_ptr + pid, token.to(tl.int64))
        tl.store(confidence_ptr + pid, confidence.to(tl.float64))
        tl.store(lse_ptr + pid, run_max + tl.log(run_sum))

    return propose_rows


def propose_triton(
    logits: Tensor,
    candidates: Tensor,
    mask_id: int,
    temperature: float,
    remasking: str,
    generator: torch.Generator | None,
    *,
    block_v: int | None = None,
) -> Proposal:
    """Same contract as `sampler.propose_reference`, with the fused kernel.

    block_v: columns per block (a power of two >= 16); None = the whole vocabulary up to 4096.
    Tests use small blocks to exercise the running statistics across blocks.
    """
    batch, block_length, vocab = logits.shape
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    rows = candidates.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices, row-major
    count = rows.numel()
    device = logits.device
    token = torch.empty(count, dtype=torch.long, device=device)
    confidence = torch.empty(count, dtype=torch.float64, device=device)
    lse = torch.empty(count, dtype=torch.float32, device=device)
    sample = temperature > 0
    seed = 0
    if sample:  # drawn on the generator's device, so one generator drives both backends
        draw_on = generator.device if generator is not None else device
        seed = int(torch.randint(_SEED_BOUND, (1,), generator=generator, device=draw_on))
    if count:
        block = block_v or min(4096, 1 << max(4, (vocab - 1).bit_length()))
        _kernel()[(count,)](
            logits,
            logits.stride(0),
            logits.stride(1),
            block_length,
            rows,
            token,
            confidence,
            lse,
            vocab,
            mask_id,
            1.0 / temperature if sample else 1.0,
            seed,
            SAMPLE=sample,
            MODE=_MODES[remasking],
            BLOCK_V=block,
            num_warps=8 if block >= 2048 else 4,
        )
    if remasking == "random":
        confidence = random_confidence(count, generator, device)
    finite = torch.isfinite(lse) & torch.isfinite(confidence)
    return Proposal(token, confidence, finite)
