"""The fused sampler-step kernel: proposal and confidence of each candidate row in one sweep.

Each program takes BLOCK_R candidate rows and reads their logits once, in tiles of BLOCK_V
columns, straight from the model output (a list of row indices, no gather copy). It keeps running
statistics per row in registers (m: running max; the sums are relative to it and rescaled when
it grows):

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

from .proposal import Proposal, random_confidence

__all__ = ["propose_triton"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
        n_rows,
        token_ptr,
        confidence_ptr,
        lse_ptr,
        n_cols,
        mask_id,
        inv_temperature,
        seed,
        SAMPLE: tl.constexpr,
        MODE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # BLOCK_R candidate rows per program; every statistic below is a (BLOCK_R,) vector.
        slot = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_range = slot < n_rows
        row = tl.load(rows_ptr + slot, mask=in_range, other=0)  # flat index b * Lb + l
        base = (row // block_length) * stride_b + (row % block_length) * stride_l
        run_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_R], tl.float32)
        run_entropy = tl.zeros([BLOCK_R], tl.float32)
        second = tl.full([BLOCK_R], float("-inf"), tl.float32)
        best = tl.zeros([BLOCK_R], tl.int32)
        noisy_best = tl.full([BLOCK_R], float("-inf"), tl.float64)
        noisy_index = tl.zeros([BLOCK_R], tl.int32)
        noisy_score = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < n_cols
            # Padding rows read zeros (finite), padding columns and the mask token read -inf.
            s = tl.load(
                logits_ptr + base[:, None] + cols[None, :],
                mask=in_range[:, None] & in_vocab[None, :],
                other=0.0,
            ).to(tl.float32)
            s = tl.where((in_vocab & (cols != mask_id))[None, :], s, float("-inf"))
            block_max = tl.max(s, axis=1)
            block_arg = tl.argmax(s, axis=1) + start
            if MODE == 1:  # the block's runner-up, then the running top-2
                runner_up = tl.where(cols[None, :] == block_arg[:, None], float("-inf"), s)
                second = tl.maximum(
                    tl.maximum(second, tl.max(runner_up, axis=1)), tl.minimum(run_max, block_max)
                )
            best = tl.where(block_max > run_max, block_arg, best)  # strict: first index wins
            new_max = tl.maximum(run_max, block_max)
            # -inf logits (excluded or impossible tokens) contribute nothing. Nothing is
            # accumulated while the running max is still -inf, so the differences below are
            # taken against finite values only (no inf - inf).
            finite_max = tl.where(new_max > float("-inf"), new_max, 0.0)
            gap = tl.where(run_sum > 0, run_max, finite_max) - finite_max  # <= 0, finite
            rescale = tl.exp(gap)
            diff = s - finite_max[:, None]
            e = tl.exp(diff)
            if MODE == 2:
                live = s > float("-inf")
                shifted = tl.sum(e * tl.where(live, diff, 0.0), axis=1)
                run_entropy = rescale * (run_entropy + gap * run_sum) + shifted
            run_sum = run_sum * rescale + tl.sum(e, axis=1)
            run_max = new_max
            if SAMPLE:
                offsets = row[:, None] * n_cols + cols[None, :]
                hi, lo, _, _ = tl.randint4x(seed, offsets)
                u = ((hi >> 5).to(tl.float64) * 67108864.0 + (lo >> 6).to(tl.float64) + 0.5) * (
                    1.0 / 9007199254740992.0
                )  # 53 random bits, in (0, 1)
                noisy = s.to(tl.float64) * inv_temperature - tl.log(-tl.log(u))
                block_noisy = tl.max(noisy, axis=1)
                block_noisy_arg = tl.argmax(noisy, axis=1) + start
                picked = cols[None, :] == block_noisy_arg[:, None]
                block_noisy_score = tl.sum(tl.where(picked, s, 0.0), axis=1)
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
            confidence = tl.zeros([BLOCK_R], tl.float32)
        tl.store(token_ptr + slot, token.to(tl.int64), mask=in_range)
        tl.store(confidence_ptr + slot, confidence.to(tl.float64), mask=in_range)
        tl.store(lse_ptr + slot, run_max + tl.log(run_sum), mask=in_range)

    return propose_rows


def _launch_config(rows: int, vocab: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps): tiles of about 4096 logits; a large vocabulary gets one
    row per program in 4096-column blocks, a small one several rows per program."""
    block_v = min(4096, 1 << max(4, (vocab - 1).bit_length()))
    block_r = min(max(1, 4096 // block_v), 1 << max(0, (rows - 1).bit_length()))
    return block_r, block_v, 8 if block_r * block_v >= 2048 else 4


def propose_triton(
    logits: Tensor,
    candidates: Tensor,
    mask_id: int,
    temperature: float,
    remasking: str,
    generator: torch.Generator | None,
    *,
    block_v: int | None = None,
    block_r: int | None = None,
) -> Proposal:
    """Same contract as `sampler.propose_reference`, with the fused kernel.

    block_v, block_r: columns per block and rows per program (powers of two, block_v >= 16);
    None = `_launch_config`. Tests use small blocks to exercise the running statistics.
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
        rows_per_program, block, warps = _launch_config(count, vocab)
        block, rows_per_program = block_v or block, block_r or rows_per_program
        grid = (_cdiv(count, rows_per_program),)
        _kernel()[grid](
            logits,
            logits.stride(0),
            logits.stride(1),
            block_length,
            rows,
            count,
            token,
            confidence,
            lse,
            vocab,
            mask_id,
            1.0 / temperature if sample else 1.0,
            seed,
            SAMPLE=sample,
            MODE=_MODES[remasking],
            BLOCK_R=rows_per_program,
            BLOCK_V=block,
            num_warps=warps,
        )
    if remasking == "random":
        confidence = random_confidence(count, generator, device)
    finite = torch.isfinite(lse) & torch.isfinite(confidence)
    return Proposal(token, confidence, finite)
