"""Iterative unmasking samplers for masked diffusion LMs (LLaDA / Fast-dLLM style).

Every step makes one model call on the whole sequence (with `cache=`, Fast-dLLM's block-wise KV
cache, only a block's first step does; its later steps run the block from the cache:
`diffusion.cache`), proposes a token for every masked position of the current
semi-autoregressive block, scores each proposal with a confidence, and commits some of them;
committed tokens and the prompt never change afterwards. `cfg_scale` adds LLaDA's
classifier-free guidance.

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

Execution: the proposals come from `diffusion.kernels.propose` (`backend`: the fused Triton
kernel on CUDA, the PyTorch reference elsewhere). With `compiler=torch.compile` (or any wrapper),
one step (model call, proposals, commits) is compiled as a whole: it then scores every position
of the block with static shapes, takes its Gumbel noise as an input drawn from `generator`
outside the graph, and the data-dependent checks run between steps, so the steady state has no
graph breaks. The Python loop over steps and its early exit stay eager.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_int, check_mask_id, check_tensor
from .cache import CACHE_MODES, supports_cache
from .kernels.dispatch import BACKENDS
from .kernels.proposal import confidence_of
from .kernels.sampler import REMASKING, propose

__all__ = ["GenerationStats", "StepInfo", "generate", "transfer_schedule"]


@dataclass(frozen=True)
class StepInfo:
    """What `generate` passes to `callback` once per step (one step = one model call).

    Attributes:
        step: 0-based index of the step (and of the model call).
        block: index of the semi-autoregressive block being decoded.
        block_step: index of the step within its block.
        tokens: (B, L) the sequence the model saw, before this step's commits.
        logits: (B, L, V) the model output used at this step, unmodified (with `cfg_scale`,
            the guided logits). At a step that ran from a KV cache only the window's logits
            exist: (B, w, V) for positions [logits_start, logits_start + w).
        predicted: (B, L) the proposed token at each position of the current block (equal to
            `tokens` elsewhere).
        confidence: (B, L) float64 confidence of each candidate (a masked position of the current
            block in an unfinished row), -inf elsewhere.
        committed: (B, L) bool, the positions committed at this step.
        logits_start: the position of `logits[:, 0]` (0 unless the step ran from a cache).
    """

    step: int
    block: int
    block_step: int
    tokens: Tensor
    logits: Tensor
    predicted: Tensor
    confidence: Tensor
    committed: Tensor
    logits_start: int = 0


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


@dataclass(frozen=True)
class _StepConfig:
    """The per-call constants of a sampler step (hashable, so compiled steps guard on them)."""

    mask_id: int
    eos_id: int | None
    temperature: float
    remasking: str
    threshold: float | None
    stop_at_eos: bool
    prompt_length: int


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
    backend: str = "auto",
    compiler: Callable[[Callable], Callable] | None = None,
    cache: str | None = None,
    cache_refresh: int | None = None,
    cfg_scale: float = 0.0,
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
        backend: "auto", "reference" or "triton": who computes the proposals
            (`diffusion.kernels.propose`; ignored when `compiler` is given).
        compiler: None, or a function applied once to the per-step function, e.g.
            `torch.compile` (module docstring). Greedy results equal the eager ones; with
            temperature > 0 the noise is drawn for every block position, so samples agree in
            law, not bit for bit.
        cache: None (every step runs the whole sequence), "prefix" or "dual": Fast-dLLM v1's
            block-wise approximate KV cache (`diffusion.cache`; the model must implement
            `CachedDenoiser`). A block's first step is a full forward that also caches every
            layer's keys and values; its later steps run only [block start, end) ("prefix")
            or the block itself ("dual") against that cache. The number of model calls is
            unchanged; each cached call is shorter. Exact for a block-causal model ("dual").
        cache_refresh: with a cache, also rebuild it (a full forward) every `cache_refresh`
            steps inside a block; None = only at the block's first step (Fast-dLLM). 1 makes
            every step a full forward: the output then equals the uncached sampler's.
        cfg_scale: w >= 0, LLaDA's unsupervised classifier-free guidance: each step's logits
            are `un + (w + 1) * (cond - un)`, where `un` are the logits of the sequence with
            every prompt position (padding included) set to `mask_id`; both in one model call
            on 2B rows. 0 = no guidance (B rows).

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
        backend,
        compiler,
        cache,
        cache_refresh,
        cfg_scale,
        model,
    )
    batch, prompt_length = prompt.shape
    device = prompt.device
    cfg = _StepConfig(
        mask_id, eos_id, float(temperature), remasking, threshold, stop_at_eos, prompt_length
    )
    x = torch.cat([prompt, prompt.new_full((batch, gen_length), mask_id)], dim=1)
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)
    if compiler is not None:
        call_model, commit = compiler(_call_model), compiler(_dense_commit)
    else:
        call_model, commit = _call_model, None
    forward = _Forward(model, call_model, full_mask, cfg, float(cfg_scale))

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
            count = counts[:, block_step] if threshold is None else None
            logits_start = 0
            if cache is None:
                logits = forward.full(x)
            elif block_step == 0 or (cache_refresh is not None and block_step % cache_refresh == 0):
                logits = forward.refresh(x)
            else:
                logits_start = lo
                logits = forward.window(x, lo, hi if cache == "dual" else x.shape[1])
            if commit is None:
                propose_fn = functools.partial(
                    _propose, cfg=cfg, generator=generator, backend=backend, step=step
                )
                out = _commit(logits, x, lo, hi, candidates, count, propose_fn, cfg, logits_start)
            else:
                noise, uniform = _step_randomness(logits, hi - lo, cfg, generator)
                out = commit(
                    logits, x, lo, hi, candidates, count, noise, uniform, cfg, logits_start
                )
                if not bool(out.finite):  # checked between steps: no sync inside the graph
                    raise _non_finite(step)
            if callback is not None:
                callback(
                    _step_info(
                        step,
                        block,
                        block_step,
                        x,
                        logits,
                        out.predicted,
                        out.confidence,
                        out.chosen,
                        lo,
                        logits_start,
                    )
                )
            x = out.x
            committed_per_step.append(out.chosen.sum(1))
            step += 1

    if not return_stats:
        return x
    per_step = (
        torch.stack(committed_per_step)
        if committed_per_step
        else torch.zeros((0, batch), dtype=torch.long, device=device)
    )
    return x, GenerationStats(model_calls=step, committed_per_step=per_step)


class _StepOutput(NamedTuple):
    x: Tensor  # (B, L) the sequence after this step's commits
    predicted: Tensor  # (B, Lb) proposals at the candidates, the block's tokens elsewhere
    confidence: Tensor  # (B, Lb) float64, -inf where not a candidate
    chosen: Tensor  # (B, Lb) bool, committed at this step
    finite: Tensor  # 0-d bool, every candidate had finite scores


def _commit(logits, x, lo, hi, candidates, count, propose_fn, cfg, start=0) -> _StepOutput:
    """The block's proposals, the commits and the new sequence, from one model output whose
    first position is `start` (0, or the window's start with a cache)."""
    block_logits = logits[:, lo - start : hi - start]
    predicted, confidence, finite = propose_fn(block_logits, x[:, lo:hi], candidates)
    if cfg.threshold is None:
        chosen = _top_k(confidence, candidates, count)
    else:
        chosen = _above_threshold(confidence, candidates, cfg.threshold)
    block_x = torch.where(chosen, predicted, x[:, lo:hi])
    new_x = torch.cat([x[:, :lo], block_x, x[:, hi:]], dim=1)
    if cfg.stop_at_eos:
        new_x = _finish_rows_at_eos(new_x, cfg.prompt_length, cfg.eos_id, cfg.mask_id)
    return _StepOutput(new_x, predicted, confidence, chosen, finite)


def _dense_commit(
    logits, x, lo, hi, candidates, count, noise, uniform, cfg, start=0
) -> _StepOutput:
    """`_commit` with static shapes, for compilers: every block position is scored."""
    propose_fn = functools.partial(_propose_dense, cfg=cfg, noise=noise, uniform=uniform)
    return _commit(logits, x, lo, hi, candidates, count, propose_fn, cfg, start)


def _non_finite(step: int) -> FloatingPointError:
    return FloatingPointError(
        f"generate: non-finite confidence at step {step}; the model returned NaN or infinite logits"
    )


def _step_info(
    step, block, block_step, x, logits, predicted, confidence, chosen, lo, logits_start
) -> StepInfo:
    """Embed the block's (B, Lb) proposals, confidences and commits into (B, L) tensors."""
    hi = lo + chosen.shape[1]
    predicted_full = x.clone()
    predicted_full[:, lo:hi] = predicted
    confidence_full = torch.full(x.shape, -torch.inf, dtype=torch.float64, device=x.device)
    confidence_full[:, lo:hi] = confidence
    committed = torch.zeros_like(x, dtype=torch.bool)
    committed[:, lo:hi] = chosen
    return StepInfo(
        step, block, block_step, x, logits, predicted_full, confidence_full, committed, logits_start
    )


class _Forward:
    """The model calls of one `generate` run: whole sequence, cache refresh or cached window,
    each with classifier-free guidance applied when `cfg_scale` > 0 (2B rows per call, the
    second half with the prompt masked)."""

    def __init__(self, model, call_model, full_mask, cfg: _StepConfig, cfg_scale: float):
        self.model, self.call_model, self.cfg, self.scale = model, call_model, cfg, cfg_scale
        self.mask = full_mask
        if cfg_scale > 0 and full_mask is not None:
            self.mask = torch.cat([full_mask, full_mask])
        self.cache = None

    def _rows(self, x: Tensor) -> Tensor:
        if self.scale == 0:
            return x
        unconditional = x.clone()
        unconditional[:, : self.cfg.prompt_length] = self.cfg.mask_id
        return torch.cat([x, unconditional])

    def _guide(self, logits: Tensor) -> Tensor:
        if self.scale == 0:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + (self.scale + 1) * (cond - uncond)

    def full(self, x: Tensor) -> Tensor:
        rows = self._rows(x)
        logits = self.call_model(self.model, rows, self.mask, self.cfg.mask_id, self.cfg.eos_id)
        return self._guide(logits)

    def refresh(self, x: Tensor) -> Tensor:
        rows = self._rows(x)
        out = self.model.forward_with_cache(rows, attention_mask=self.mask)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("generate: model.forward_with_cache must return (logits, cache)")
        logits, self.cache = out
        return self._guide(_checked_logits(logits, rows.shape, self.cfg.mask_id, self.cfg.eos_id))

    def window(self, x: Tensor, start: int, stop: int) -> Tensor:
        rows = self._rows(x)[:, start:stop]
        out = self.model.forward_from_cache(rows, self.cache, start=start, attention_mask=self.mask)
        logits = _checked_logits(
            getattr(out, "logits", out), rows.shape, self.cfg.mask_id, self.cfg.eos_id
        )
        return self._guide(logits)


def _call_model(
    model, x: Tensor, full_mask: Tensor | None, mask_id: int, eos_id: int | None
) -> Tensor:
    out = model(x) if full_mask is None else model(x, attention_mask=full_mask)
    return _checked_logits(getattr(out, "logits", out), x.shape, mask_id, eos_id)


def _checked_logits(logits, shape, mask_id: int, eos_id: int | None) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != shape:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"generate: model must return logits of shape ({shape[0]}, {shape[1]}, V), got {got}"
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
    *,
    cfg: _StepConfig,
    generator: torch.Generator | None,
    backend: str,
    step: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Proposals and confidences for the candidates of one block (eager: only they are scored).

    Args:
        logits: (B, Lb, V) the block's logits; tokens: (B, Lb) its current tokens;
        candidates: (B, Lb) bool, the positions that may be committed.

    Returns:
        predicted (B, Lb): the proposal at the candidates, `tokens` elsewhere;
        confidence (B, Lb) float64: the candidates' confidences, -inf elsewhere;
        finite: 0-d bool, True (a non-finite score raises here, with the step number).
    """
    proposal = propose(
        logits,
        candidates,
        mask_id=cfg.mask_id,
        temperature=cfg.temperature,
        remasking=cfg.remasking,
        generator=generator,
        backend=backend,
    )
    if not bool(proposal.finite.all()):
        raise _non_finite(step)
    predicted = tokens.masked_scatter(candidates, proposal.token.to(tokens.dtype))
    full_confidence = torch.full(
        candidates.shape, -torch.inf, dtype=torch.float64, device=logits.device
    )
    confidence = full_confidence.masked_scatter(candidates, proposal.confidence)
    return predicted, confidence, proposal.finite.all()


def _step_randomness(logits: Tensor, block_length: int, cfg: _StepConfig, generator):
    """The random inputs of a compiled commit, drawn from `generator` outside the graph:
    float64 uniforms (B, Lb, V) for the Gumbel noise (T > 0) and (B, Lb) float64 uniforms for
    "random" confidences; None when not needed."""
    batch, _, vocab = logits.shape
    noise = uniform = None
    if cfg.temperature > 0:
        noise = torch.rand(
            (batch, block_length, vocab),
            generator=generator,
            device=logits.device,
            dtype=torch.float64,
        )
    if cfg.remasking == "random":
        uniform = torch.rand(
            (batch, block_length), generator=generator, device=logits.device, dtype=torch.float64
        )
    return noise, uniform


def _propose_dense(
    logits: Tensor,
    tokens: Tensor,
    candidates: Tensor,
    *,
    cfg: _StepConfig,
    noise: Tensor | None,
    uniform: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`_propose` for every block position at once (static shapes, no sync, no generator).

    The same formulas as `diffusion.kernels.propose_reference`; `noise` (B, Lb, V) and
    `uniform` (B, Lb) are float64 U[0, 1) draws. Returns the same triple as `_propose`, with
    `finite` a 0-d bool tensor to be checked by the caller.
    """
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    is_mask = torch.arange(scores.shape[-1], device=scores.device) == cfg.mask_id
    scores = scores.masked_fill(is_mask, -torch.inf)
    top, picked = scores.max(-1)
    if noise is not None:
        gumbel = noise.clamp(min=torch.finfo(torch.float64).tiny).log().neg().log()  # -G
        picked = (gumbel - scores / cfg.temperature).argmin(-1)  # argmax(scores / T + G)
    picked_score = scores.gather(-1, picked[..., None]).squeeze(-1)
    probs = (scores - top[..., None]).exp()
    total = probs.sum(-1)
    if cfg.remasking == "random":
        confidence = uniform
    else:
        confidence = confidence_of(picked_score, top, probs, total, cfg.remasking)
    finite = (torch.isfinite(top) & torch.isfinite(confidence)) | ~candidates
    predicted = torch.where(candidates, picked.to(tokens.dtype), tokens)
    confidence = torch.where(candidates, confidence.double(), -torch.inf)
    return predicted, confidence, finite.all()


def _top_k(confidence: Tensor, candidates: Tensor, count: Tensor) -> Tensor:
    """Per row, the count[b] most confident candidates (ties: lower position first)."""
    order = confidence.argsort(dim=1, descending=True, stable=True)
    # The inverse permutation, as the argsort of a permutation (exact: no ties). A scatter into
    # an empty tensor is equivalent, but inductor (torch 2.13, CPU) miscompiled it inside the
    # fused commit graph (every candidate came out chosen).
    rank = order.argsort(dim=1)
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
    backend,
    compiler,
    cache,
    cache_refresh,
    cfg_scale,
    model,
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
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    if compiler is not None and not callable(compiler):
        raise TypeError(
            f"{fn}: compiler must be None or callable (e.g. torch.compile), "
            f"got {type(compiler).__name__}"
        )
    if cache not in CACHE_MODES:
        raise ValueError(f"{fn}: cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache is not None:
        if not supports_cache(model):
            raise TypeError(
                f"{fn}: cache={cache!r} needs a model with forward_with_cache and "
                f"forward_from_cache (diffusion.CachedDenoiser); {type(model).__name__} has not"
            )
        if compiler is not None:
            raise ValueError(f"{fn}: compiler is not supported with cache={cache!r}")
    if cache_refresh is not None:
        check_int(fn, "cache_refresh", cache_refresh, minimum=1)
        if cache is None:
            raise ValueError(f"{fn}: cache_refresh={cache_refresh} needs cache='prefix' or 'dual'")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
        raise TypeError(f"{fn}: cfg_scale must be a float, got {type(cfg_scale).__name__}")
    if not (0.0 <= cfg_scale < float("inf")):
        raise ValueError(f"{fn}: cfg_scale must be finite and >= 0, got {cfg_scale}")
    return num_blocks, steps_per_block, block_length
