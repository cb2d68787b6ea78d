"""Block-aligned threshold sampler of LLaDA2.x (the sampler of MemDLM's LLaDA2.1 evaluation).

This reproduces the decoding rule of `LLaDA2Sampler.sample` in the MemDLM authors' code
(JarvisPei/MemDLM, `memdlm/pipelines/llada21/sampler.py`, which mirrors the mask-filling part of
`LLaDA2MoeModelLM.generate` without its token editing). It differs from `diffusion.generate` in
where blocks start, how many tokens a step commits and how the threshold acts:

    canvas       prompt (length P) + gen_length positions, padded with masks up to
                 N = ceil((P + gen_length) / Lb) whole blocks of Lb = block_length positions,
                 counted from position 0. The padding is generated too; the whole canvas
                 (B, N * Lb) is returned.
    blocks       from block floor(P / Lb) (the one holding the prompt's end, or the first block
                 after the prompt when P is a multiple of Lb) to N - 1, left to right.
    model calls  on the prefix x[:, :(j + 1) * Lb] of the current block j (the authors pass a
                 block-causal mask with it; here the model's own attention is used, see below).
    steps        S = min(steps_per_block, gen_length // minimal_topk) per block
                 (steps_per_block defaults to block_length, the authors' 32 for 32); step k may
                 commit c_k = floor(Lb / S) + [k < Lb mod S] tokens (`even_transfer_schedule`).
                 A block whose masks are all filled skips its remaining steps.
    proposals    temperature 0: argmax of the logits with its probability p under softmax(logits);
                 T > 0: a draw from softmax(logits / T) with its probability under that
                 distribution. The mask token is not excluded (as in the authors' code).
    commits      among the block's masked positions, H = {p > threshold}; if |H| >= c_k commit
                 all of H, else the min(c_k, #masked) most probable masked positions (torch.topk).
                 Committed and prompt tokens never change.
    stop_at_eos  the authors' `eos_early_stop`: after a step, if the current block of any row
                 holds `eos_id`, the block's remaining steps are skipped and decoding moves on to
                 the next block (the skipped block can keep masks; this is their rule, kept as
                 it is). Off by default, as in their evaluation.

Attention: the authors run LLaDA2.1 with a block-causal mask (a query in block i sees blocks
0..i). Pass a model that attends that way (e.g. a Hugging Face backbone inside
`attention_mode("block_causal", block_length)`); a bidirectional model is run on the same
prefixes, which is what the authors' call would compute without the mask. For a block-causal
model the current block's logits do not depend on what follows it, so prefix and whole-canvas
calls agree there.

Since S * c_k sums to Lb >= #masked and every step commits at least min(c_k, #masked) with
c_k >= 1 whenever S <= Lb, every block is full after its S steps (unless `stop_at_eos` skipped
steps, or the model proposed the mask token itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_int, check_mask_id, check_tensor

__all__ = ["block_aligned_steps", "even_transfer_schedule", "generate_block_aligned"]


def even_transfer_schedule(block_length: int, steps: int) -> Tensor:
    """The per-step commit counts of a block: floor(Lb / S) + [k < Lb mod S], k = 0..S-1.

    (`even_transfer_schedule` of the authors' sampler.) Returns a long tensor of shape (S,)
    summing to Lb; entries are 0 when S > Lb (such steps commit only tokens above the
    threshold).
    """
    check_int("even_transfer_schedule", "block_length", block_length, minimum=1)
    check_int("even_transfer_schedule", "steps", steps, minimum=1)
    base, remainder = divmod(block_length, steps)
    counts = torch.full((steps,), base, dtype=torch.long)
    counts[:remainder] += 1
    return counts


def block_aligned_steps(
    gen_length: int, *, block_length: int = 32, steps_per_block: int | None = None, minimal_topk=1
) -> int:
    """S = min(steps_per_block, gen_length // minimal_topk), steps_per_block defaulting to
    block_length: the number of steps each block gets in `generate_block_aligned`."""
    fn = "block_aligned_steps"
    check_int(fn, "gen_length", gen_length, minimum=1)
    check_int(fn, "block_length", block_length, minimum=1)
    check_int(fn, "minimal_topk", minimal_topk, minimum=1)
    if steps_per_block is None:
        steps_per_block = block_length
    check_int(fn, "steps_per_block", steps_per_block, minimum=1)
    if minimal_topk > gen_length:
        raise ValueError(
            f"{fn}: minimal_topk={minimal_topk} must be <= gen_length={gen_length} "
            "(gen_length // minimal_topk would give 0 steps per block)"
        )
    return min(steps_per_block, gen_length // minimal_topk)


@torch.no_grad()
def generate_block_aligned(
    model: Callable[..., Tensor],
    prompt: Tensor,
    *,
    mask_id: int,
    gen_length: int,
    block_length: int = 32,
    steps_per_block: int | None = None,
    threshold: float = 0.95,
    minimal_topk: int = 1,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
) -> Tensor:
    """LLaDA2.x's block-aligned threshold sampler (module docstring has the rule).

    Args:
        model: callable mapping (B, L) tokens to (B, L, V) logits, or to an object with
            `.logits`; it is called on prefixes ending at a block boundary.
        prompt: (B, P) integer tokens free of `mask_id` (one length for all rows; P may be 0).
        mask_id: the mask token id (< V).
        gen_length: tokens to generate (the canvas is then padded up to whole blocks).
        block_length: Lb, the block size (blocks counted from position 0).
        steps_per_block: the authors' `steps_per_block` (None = block_length, their default
            32 for 32); capped at gen_length // minimal_topk.
        threshold: commit every masked position of the block whose probability exceeds it,
            when at least the step's count of them do.
        minimal_topk: caps the steps per block at gen_length // minimal_topk (1..gen_length).
        temperature: 0 = greedy; T > 0 = draws from softmax(logits / T) (`torch.multinomial`,
            float64, from `generator`; None = torch's global random state).
        eos_id, stop_at_eos: the authors' `eos_early_stop` (module docstring); `stop_at_eos`
            needs `eos_id`.

    Returns:
        (B, N * Lb) long: the whole canvas, prompt first; `out[:, P:P + gen_length]` are the
        requested tokens, the rest is the generated padding that the authors' evaluation
        decodes with them.
    """
    fn = "generate_block_aligned"
    check_tensor(fn, "prompt", prompt, ndim=2, dtype="long")
    check_mask_id(fn, mask_id)
    check_int(fn, "gen_length", gen_length, minimum=1)
    check_int(fn, "block_length", block_length, minimum=1)
    check_int(fn, "minimal_topk", minimal_topk, minimum=1)
    if steps_per_block is not None:
        check_int(fn, "steps_per_block", steps_per_block, minimum=1)
    if minimal_topk > gen_length:
        raise ValueError(
            f"{fn}: minimal_topk={minimal_topk} must be <= gen_length={gen_length} "
            "(gen_length // minimal_topk would give 0 steps per block)"
        )
    steps = block_aligned_steps(
        gen_length,
        block_length=block_length,
        steps_per_block=steps_per_block,
        minimal_topk=minimal_topk,
    )
    for name, value in (("threshold", threshold), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    if math.isnan(threshold):
        raise ValueError(f"{fn}: threshold must be a number, got {threshold}")
    if not (0.0 <= temperature < math.inf):
        raise ValueError(f"{fn}: temperature must be finite and >= 0, got {temperature}")
    if eos_id is not None:
        check_int(fn, "eos_id", eos_id, minimum=0)
    if stop_at_eos and eos_id is None:
        raise ValueError(f"{fn}: stop_at_eos=True needs eos_id")
    if bool((prompt == mask_id).any()):
        raise ValueError(f"{fn}: prompt contains the mask id {mask_id}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None")

    batch, prompt_length = prompt.shape
    num_blocks = -(-(prompt_length + gen_length) // block_length)
    x = prompt.new_full((batch, num_blocks * block_length), mask_id)
    x[:, :prompt_length] = prompt
    counts = even_transfer_schedule(block_length, steps).tolist()

    for block in range(prompt_length // block_length, num_blocks):
        lo, hi = block * block_length, (block + 1) * block_length
        for count in counts:
            masked = x[:, lo:hi] == mask_id
            if not bool(masked.any()):
                break
            logits = _block_logits(model, x[:, :hi], block_length, mask_id, eos_id)
            tokens, prob = _proposals(logits, temperature, generator)
            confidence = torch.where(masked, prob, -torch.inf)
            chosen = torch.zeros_like(masked)
            for row in range(batch):
                high = (confidence[row] > threshold) & masked[row]
                if int(high.sum()) >= count:
                    chosen[row] = high
                elif count > 0 and bool(masked[row].any()):
                    k = min(count, int(masked[row].sum()))
                    chosen[row, torch.topk(confidence[row], k=k).indices] = True
            x[:, lo:hi] = torch.where(chosen, tokens.to(x.dtype), x[:, lo:hi])
            if stop_at_eos and bool((x[:, lo:hi] == eos_id).any()):
                break
    return x


def _block_logits(model, x: Tensor, block_length: int, mask_id: int, eos_id) -> Tensor:
    """The model's logits for the last `block_length` positions of `x`, checked."""
    out = model(x)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"generate_block_aligned: model must return logits of shape "
            f"({x.shape[0]}, {x.shape[1]}, V), got {got}"
        )
    vocab = logits.shape[-1]
    if not logits.is_floating_point() or mask_id >= vocab:
        raise ValueError(
            f"generate_block_aligned: mask_id={mask_id} must be a token of the model's "
            f"vocabulary of size {vocab} (float logits expected, got {logits.dtype})"
        )
    if eos_id is not None and eos_id >= vocab:
        raise ValueError(
            f"generate_block_aligned: eos_id={eos_id} is outside the vocabulary of size {vocab}"
        )
    block = logits[:, -block_length:]
    if not bool(torch.isfinite(block).all()):
        raise FloatingPointError("generate_block_aligned: the model returned non-finite logits")
    return block


def _proposals(logits: Tensor, temperature: float, generator) -> tuple[Tensor, Tensor]:
    """(tokens, their probabilities) for each position: greedy under softmax(logits), or a
    draw from softmax(logits / T) with its probability there (float64)."""
    scores = logits.double()
    if temperature == 0:
        probs = torch.softmax(scores, dim=-1)
        tokens = probs.argmax(-1)
    else:
        probs = torch.softmax(scores / temperature, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)
