"""Iterative unmasking samplers for masked diffusion LMs (LLaDA / Fast-dLLM style).

Every step makes one model call on the whole sequence, proposes a token for every masked position
of the current semi-autoregressive block, scores each proposal with a confidence, and commits
some of them; committed tokens and the prompt never change afterwards.

Rules (docs/diffusion.md has the details):
    proposal     temperature 0: argmax; T > 0: argmax(logits / T + Gumbel) in float64, which is a
                 draw from softmax(logits / T) that never exponentiates the logits. The mask token
                 is never proposed.
    confidence   "low_confidence": p(proposal) under the untempered softmax (mask token excluded);
                 "margin": p1 - p2; "entropy": sum p log p (negative entropy); "random": U(0, 1).
    commits      fixed count (no threshold): block b gets steps / num_blocks steps, and step k of
                 a block with M masks commits floor(M / S) + [k < M mod S] tokens (LLaDA's
                 front-loaded remainder), the most confident first;
                 threshold tau: every proposal with confidence > tau, and at least the most
                 confident one (Fast-dLLM); a block then runs until it holds no mask.
    stop_at_eos  a row whose generation holds an EOS with no mask before it is finished: every
                 position after its first EOS becomes EOS and it takes no further commits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_int, check_mask_id, check_tensor

__all__ = ["GenerationStats", "StepInfo", "generate", "transfer_schedule"]

REMASKING = ("low_confidence", "random", "margin", "entropy")


@dataclass(frozen=True)
class StepInfo:
    """What `generate` passes to `callback` once per step (one step = one model call).

    Attributes:
        step: 0-based index of the step (and of the model call).
        block: index of the semi-autoregressive block being decoded.
        block_step: index of the step within its block.
        tokens: (B, L) the sequence the model saw, before this step's commits.
        logits: (B, L, V) the model output used at this step, unmodified.
        predicted: (B, L) the proposed token at each position of the current block (equal to
            `tokens` elsewhere).
        confidence: (B, L) float64 confidence of each candidate (a masked position of the current
            block in an unfinished row), -inf elsewhere.
        committed: (B, L) bool, the positions committed at this step.
    """

    step: int
    block: int
    block_step: int
    tokens: Tensor
    logits: Tensor
    predicted: Tensor
    confidence: Tensor
    committed: Tensor


@dataclass(frozen=True)
class GenerationStats:
    """model_calls: number of forward passes made; committed_per_step: (model_calls, B) tokens
    committed in each row at each step (the EOS filling of `stop_at_eos` not included)."""

    model_calls: int
    committed_per_step: Tensor

    @property
    def tokens_per_call(self) -> float:
        """Mean number of tokens committed per row per model call."""
        if self.model_calls == 0:
            return 0.0
        return float(self.committed_per_step.double().mean())


def transfer_schedule(num_masked: Tensor | int, steps: int) -> Tensor:
    """LLaDA's per-step commit counts: floor(M / S) + [k < M mod S] for k = 0..S-1.

    Args:
        num_masked: M, an int or an integer tensor of any shape (e.g. (B,)).
        steps: S >= 1.

    Returns:
        long tensor of shape (*M.shape, S) whose last axis sums to M.
    """
    check_int("transfer_schedule", "steps", steps, minimum=1)
    num_masked = torch.as_tensor(num_masked, dtype=torch.long)
    if bool((num_masked < 0).any()):
        raise ValueError(f"transfer_schedule: num_masked must be >= 0, got {num_masked.tolist()}")
    base = torch.div(num_masked, steps, rounding_mode="floor")
    remainder = num_masked - base * steps
    k = torch.arange(steps, device=num_masked.device)
    return base[..., None] + (k < remainder[..., None]).long()


@torch.no_grad()
def generate(
    model: Callable[..., Tensor],
    prompt: Tensor,
    *,
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int | None = None,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, GenerationStats]:
    """Generate `gen_length` tokens after `prompt` by iterative unmasking.

    Args:
        model: callable; `model(x)` (or `model(x, attention_mask=m)` when `attention_mask` is
            given) maps (B, L) tokens to (B, L, V) logits, or to an object with `.logits`.
        prompt: (B, P) integer tokens, free of `mask_id` (P may be 0).
        mask_id: the mask token id, < V.
        gen_length: number of tokens to generate.
        steps: number of model calls with fixed-count commits; must split evenly over the
            blocks, with at most `block_length` steps per block. With `threshold` the blocks run
            until filled and `steps` only has to satisfy the same divisibility.
        block_length: semi-autoregressive block size (None = gen_length, one block); must
            divide gen_length.
        remasking: "low_confidence", "random", "margin" or "entropy" (module docstring).
        temperature: 0 for greedy, > 0 for Gumbel-max sampling from softmax(logits / T).
        threshold: None for fixed counts, else the confidence a proposal must exceed.
        generator: `torch.Generator` for the Gumbel noise and the random confidences.
        callback: called once per step with a `StepInfo`.
        attention_mask: (B, P) bool for LEFT-padded prompts, True = real token; the model then
            gets `attention_mask=` of shape (B, P + gen_length) (generated positions are True).
        eos_id: the end-of-sequence id (needed by `stop_at_eos`).
        stop_at_eos: finish a row once it holds an EOS with no mask before it (module docstring).
        return_stats: also return a `GenerationStats`.

    Returns:
        (B, P + gen_length) tokens without `mask_id`, or (tokens, stats).
    """
    num_blocks, steps_per_block, block_length = _validate(
        prompt,
        mask_id,
        gen_length,
        steps,
        block_length,
        remasking,
        temperature,
        threshold,
        callback,
        attention_mask,
        eos_id,
        stop_at_eos,
        return_stats,
    )
    batch, prompt_length = prompt.shape
    device = prompt.device
    x = torch.cat([prompt, prompt.new_full((batch, gen_length), mask_id)], dim=1)
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)

    committed_per_step: list[Tensor] = []
    step = 0
    for block in range(num_blocks):
        lo = prompt_length + block * block_length
        hi = lo + block_length
        counts = transfer_schedule((x[:, lo:hi] == mask_id).sum(1), steps_per_block)
        block_steps = range(steps_per_block) if threshold is None else itertools.count()
        for block_step in block_steps:
            candidates = x[:, lo:hi] == mask_id
            if not bool(candidates.any()):
                break  # filled (or every row finished at EOS): no model call is needed
            logits = _call_model(model, x, full_mask, mask_id, eos_id)
            predicted, confidence = _propose(
                logits[:, lo:hi],
                x[:, lo:hi],
                candidates,
                mask_id,
                temperature,
                remasking,
                generator,
                step,
            )
            if threshold is None:
                chosen = _top_k(confidence, candidates, counts[:, block_step])
            else:
                chosen = _above_threshold(confidence, candidates, threshold)

            if callback is not None:
                callback(
                    _step_info(
                        step, block, block_step, x, logits, predicted, confidence, chosen, lo
                    )
                )
            block_x = torch.where(chosen, predicted, x[:, lo:hi])
            x = torch.cat([x[:, :lo], block_x, x[:, hi:]], dim=1)
            if stop_at_eos:
                x = _finish_rows_at_eos(x, prompt_length, eos_id, mask_id)
            committed_per_step.append(chosen.sum(1))
            step += 1

    if not return_stats:
        return x
    per_step = (
        torch.stack(committed_per_step)
        if committed_per_step
        else torch.zeros((0, batch), dtype=torch.long, device=device)
    )
    return x, GenerationStats(model_calls=step, committed_per_step=per_step)


def _step_info(step, block, block_step, x, logits, predicted, confidence, chosen, lo) -> StepInfo:
    """Embed the block's (B, Lb) proposals, confidences and commits into (B, L) tensors."""
    hi = lo + chosen.shape[1]
    predicted_full = x.clone()
    predicted_full[:, lo:hi] = predicted
    confidence_full = torch.full(x.shape, -torch.inf, dtype=torch.float64, device=x.device)
    confidence_full[:, lo:hi] = confidence
    committed = torch.zeros_like(x, dtype=torch.bool)
    committed[:, lo:hi] = chosen
    return StepInfo(step, block, block_step, x, logits, predicted_full, confidence_full, committed)


def _call_model(
    model, x: Tensor, full_mask: Tensor | None, mask_id: int, eos_id: int | None
) -> Tensor:
    out = model(x) if full_mask is None else model(x, attention_mask=full_mask)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"generate: model must return logits of shape ({x.shape[0]}, {x.shape[1]}, V), "
            f"got {shape}"
        )
    vocab = logits.shape[-1]
    if not logits.is_floating_point() or vocab < 2 or mask_id >= vocab:
        raise ValueError(
            f"generate: mask_id={mask_id} must be a token of the model's vocabulary of size "
            f"{vocab} (float logits with V >= 2 expected, got {logits.dtype})"
        )
    if eos_id is not None and eos_id >= vocab:
        raise ValueError(
            f"generate: eos_id={eos_id} is outside the model's vocabulary of size {vocab}"
        )
    return logits


def _propose(
    logits: Tensor,
    tokens: Tensor,
    candidates: Tensor,
    mask_id: int,
    temperature: float,
    remasking: str,
    generator: torch.Generator | None,
    step: int,
) -> tuple[Tensor, Tensor]:
    """Proposals and confidences for the candidates of one block.

    Args:
        logits: (B, Lb, V) the block's logits; tokens: (B, Lb) its current tokens;
        candidates: (B, Lb) bool, the positions that may be committed.

    Returns:
        predicted (B, Lb): the proposal at the candidates, `tokens` elsewhere;
        confidence (B, Lb) float64: the candidates' confidences, -inf elsewhere.
    """
    # Only the candidate rows are scored: the other proposals are never used, and this halves the
    # work on average in a single long block. Boolean indexing copies, so writing the mask column
    # leaves the caller's logits (also handed to the callback) untouched.
    scores = logits[candidates].to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    scores[:, mask_id] = -torch.inf
    top, picked = scores.max(-1)
    if temperature > 0:
        picked = _gumbel_argmax(scores, temperature, generator)
    picked_score = scores.gather(-1, picked[:, None]).squeeze(-1)
    # Untempered softmax, in place on the copy: probs = exp(scores - top) / total.
    probs = scores.sub_(top[:, None]).exp_()
    total = probs.sum(-1)

    if remasking == "low_confidence":
        confidence = (picked_score - top).exp() / total
    elif remasking == "margin":
        top2 = probs.topk(2, dim=-1).values / total[:, None]
        confidence = top2[:, 0] - top2[:, 1]
    elif remasking == "entropy":
        confidence = -torch.special.entr(probs.div_(total[:, None])).sum(-1)
    else:  # "random"
        confidence = torch.rand(
            scores.shape[0], generator=generator, device=scores.device, dtype=torch.float64
        )
    if not bool((torch.isfinite(top) & torch.isfinite(confidence)).all()):
        raise FloatingPointError(
            f"generate: non-finite confidence at step {step}; "
            "the model returned NaN or infinite logits"
        )
    predicted = tokens.masked_scatter(candidates, picked.to(tokens.dtype))
    full_confidence = torch.full(
        candidates.shape, -torch.inf, dtype=torch.float64, device=scores.device
    )
    return predicted, full_confidence.masked_scatter(candidates, confidence.double())


def _gumbel_argmax(scores: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """argmax_v(scores_v / T + G_v), G_v = -log(-log U_v) iid Gumbel(0, 1), in float64.

    This is an exact draw from softmax(scores / T) (Gumbel-max trick) that never exponentiates the
    logits, so it cannot overflow; float64 keeps the noise's tail (arXiv 2409.02908 shows float32
    Gumbel noise lowers the effective temperature). In place, one allocation.
    """
    noise = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float64)
    # U in [tiny, 1): -log U in (0, 709], so the Gumbel noise is finite.
    noise.clamp_(min=torch.finfo(torch.float64).tiny).log_().neg_().log_()  # log(-log U) = -G
    return noise.sub_(scores, alpha=1.0 / temperature).argmin(-1)  # argmax(scores / T + G)


def _top_k(confidence: Tensor, candidates: Tensor, count: Tensor) -> Tensor:
    """Per row, the count[b] most confident candidates (ties: lower position first)."""
    order = confidence.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(confidence.shape[1], device=confidence.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return candidates & (rank < count[:, None])


def _above_threshold(confidence: Tensor, candidates: Tensor, threshold: float) -> Tensor:
    """Candidates above the threshold, plus each row's most confident one (progress guarantee)."""
    best = _top_k(confidence, candidates, torch.ones_like(confidence[:, 0], dtype=torch.long))
    return best | (candidates & (confidence > threshold))


def _finish_rows_at_eos(x: Tensor, start: int, eos_id: int, mask_id: int) -> Tensor:
    """Rows whose generation has an EOS with no mask before it: everything after it becomes EOS."""
    generated = x[:, start:]
    is_eos = generated == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), generated.shape[1])
    positions = torch.arange(generated.shape[1], device=x.device)
    before = positions < first_eos[:, None]
    finished = is_eos.any(1) & ~((generated == mask_id) & before).any(1)
    fill = finished[:, None] & (positions > first_eos[:, None])
    generated = torch.where(fill, torch.full_like(generated, eos_id), generated)
    return torch.cat([x[:, :start], generated], dim=1)


def _validate(
    prompt,
    mask_id,
    gen_length,
    steps,
    block_length,
    remasking,
    temperature,
    threshold,
    callback,
    attention_mask,
    eos_id,
    stop_at_eos,
    return_stats,
) -> tuple[int, int, int]:
    fn = "generate"
    check_tensor(fn, "prompt", prompt, ndim=2, dtype="long")
    check_mask_id(fn, mask_id)
    check_int(fn, "gen_length", gen_length, minimum=1)
    check_int(fn, "steps", steps, minimum=1)
    if block_length is None:
        block_length = gen_length
    check_int(fn, "block_length", block_length, minimum=1)
    if gen_length % block_length:
        raise ValueError(
            f"{fn}: gen_length={gen_length} must be a multiple of block_length={block_length}"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"{fn}: steps={steps} must be a multiple of the number of blocks "
            f"gen_length / block_length = {num_blocks}"
        )
    steps_per_block = steps // num_blocks
    if threshold is None and steps_per_block > block_length:
        raise ValueError(
            f"{fn}: steps={steps} gives {steps_per_block} steps per block but a block has only "
            f"{block_length} tokens; steps must be <= gen_length = {gen_length}"
        )
    if remasking not in REMASKING:
        raise ValueError(f"{fn}: remasking must be one of {REMASKING}, got {remasking!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{fn}: temperature must be a float, got {type(temperature).__name__}")
    if not (0.0 <= temperature < float("inf")):
        raise ValueError(f"{fn}: temperature must be finite and >= 0, got {temperature}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(
                f"{fn}: threshold must be a float or None, got {type(threshold).__name__}"
            )
        if threshold != threshold:
            raise ValueError(f"{fn}: threshold must not be NaN")
    if callback is not None and not callable(callback):
        raise TypeError(f"{fn}: callback must be callable, got {type(callback).__name__}")
    if bool((prompt == mask_id).any()):
        raise ValueError(f"{fn}: prompt contains mask_id={mask_id}; prompts must be free of masks")
    if attention_mask is not None:
        check_tensor(fn, "attention_mask", attention_mask, ndim=2, dtype="bool", shape=prompt.shape)
        if bool((attention_mask[:, :-1] & ~attention_mask[:, 1:]).any()):
            raise ValueError(
                f"{fn}: attention_mask must describe LEFT padding "
                "(False... then True...) in every row"
            )
    if eos_id is not None:
        check_int(fn, "eos_id", eos_id, minimum=0)
        if eos_id == mask_id:
            raise ValueError(f"{fn}: eos_id and mask_id must differ, both are {eos_id}")
    for name, flag in (("stop_at_eos", stop_at_eos), ("return_stats", return_stats)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__}")
    if stop_at_eos and eos_id is None:
        raise ValueError(f"{fn}: stop_at_eos=True needs eos_id")
    return num_blocks, steps_per_block, block_length
