"""Likelihood for masked diffusion LMs: LLaDA's Monte-Carlo ELBO of log p(response | prompt).

With R response tokens, the NELBO (the any-order autoregressive bound, RADD / LLaDA eq. 6) is

    -log p(r | p) <= sum_{l=1}^{R} E_{|S|=l} [ (1/l) sum_{i in S} -log p_theta(r_i | p, r_{-S}) ]
                   = E_{l ~ U{1..R}} E_{|S|=l} [ (R/l) sum_{i in S} -log p_theta(r_i | p, r_{-S}) ]

where S is a uniformly random set of l masked response positions (the prompt is never masked).
It is an equality for an exact denoiser. One Monte-Carlo sample draws l, masks exactly l positions
and scores them with weight R/l. Within each forward batch the l are stratified: a uniform shift
k plus an even grid, l_j = ((k + round(j R / n)) mod R) + 1, so each l_j is marginally uniform
(the estimate is unbiased) while the batch covers 1..R evenly (lower variance than iid l, LLaDA's
`get_log_likelihood`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_int, check_mask_id, check_tensor

__all__ = ["choose", "elbo_log_likelihood"]


@torch.no_grad()
def elbo_log_likelihood(
    model: Callable[..., Tensor],
    prompt: Tensor,
    response: Tensor,
    *,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Monte-Carlo ELBO estimate of log p(response | prompt), one value per row.

    Args:
        model: `model(x)` (or `model(x, attention_mask=m)`) -> (N, L, V) logits, or an object
            with `.logits`.
        prompt: (B, P) integer tokens (P may be 0), free of `mask_id`.
        response: (B, R) integer tokens, R >= 1, free of `mask_id`.
        mask_id: the mask token id.
        mc_num: number of Monte-Carlo samples per row.
        batch_size: samples per row in one forward pass (the model sees B * batch_size rows).
        generator: optional `torch.Generator`.
        attention_mask: optional (B, P) bool for left-padded prompts (True = real token).

    Returns:
        (B,) float64 estimates of the ELBO (<= log p for the model's joint, in nats).
    """
    fn = "elbo_log_likelihood"
    check_tensor(fn, "prompt", prompt, ndim=2, dtype="long")
    batch, prompt_length = prompt.shape
    check_tensor(fn, "response", response, ndim=2, dtype="long")
    if response.shape[0] != batch or response.shape[1] < 1:
        raise ValueError(
            f"{fn}: response must have shape ({batch}, R) with R >= 1, got {tuple(response.shape)}"
        )
    check_mask_id(fn, mask_id)
    check_int(fn, "mc_num", mc_num, minimum=1)
    check_int(fn, "batch_size", batch_size, minimum=1)
    if attention_mask is not None:
        check_tensor(fn, "attention_mask", attention_mask, ndim=2, dtype="bool", shape=prompt.shape)
    if bool((prompt == mask_id).any()) or bool((response == mask_id).any()):
        raise ValueError(f"{fn}: prompt and response must not contain mask_id={mask_id}")

    response_length = response.shape[1]
    x0 = torch.cat([prompt, response], dim=1)
    total = torch.zeros(batch, dtype=torch.float64, device=prompt.device)
    done = 0
    while done < mc_num:
        n = min(batch_size, mc_num - done)
        num_masked = _stratified_counts(batch, n, response_length, generator, prompt.device)
        masked = _random_subsets(num_masked, response_length, generator)  # (B, n, R)
        total += _score(model, x0, prompt_length, masked, num_masked, mask_id, attention_mask).sum(
            1
        )
        done += n
    return -total / mc_num


def _stratified_counts(batch: int, n: int, length: int, generator, device) -> Tensor:
    """(B, n) numbers of masked tokens in 1..length: a uniform shift per row plus an even grid."""
    shift = torch.randint(0, length, (batch, 1), generator=generator, device=device)
    grid = torch.round(torch.arange(n, device=device, dtype=torch.float64) * length / n).long()
    return torch.remainder(shift + grid, length) + 1


def _random_subsets(num_masked: Tensor, length: int, generator) -> Tensor:
    """(..., length) bool with exactly num_masked[...] True positions, uniformly at random."""
    keys = torch.rand(
        (*num_masked.shape, length),
        generator=generator,
        device=num_masked.device,
        dtype=torch.float64,
    )
    rank = keys.argsort(dim=-1).argsort(dim=-1)  # a uniformly random permutation of 0..length-1
    return rank < num_masked[..., None]


def _score(model, x0, prompt_length, masked, num_masked, mask_id, attention_mask) -> Tensor:
    """(B, n) single-sample NELBO estimates (R / l) * sum_{i in S} CE_i."""
    batch, n, response_length = masked.shape
    xt = x0[:, None, :].repeat(1, n, 1)
    response_t = xt[..., prompt_length:]
    response_t[masked] = mask_id
    xt = xt.reshape(batch * n, -1)
    if attention_mask is None:
        out = model(xt)
    else:
        full = torch.cat([attention_mask, attention_mask.new_ones(batch, response_length)], dim=1)
        out = model(xt, attention_mask=full.repeat_interleave(n, dim=0))
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != xt.shape:
        raise ValueError(
            f"elbo_log_likelihood: model must return logits of shape {(*xt.shape, 'V')}, got "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    response_logits = logits[:, prompt_length:].reshape(batch, n, response_length, -1)
    targets = x0[:, None, prompt_length:].expand(batch, n, response_length)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(
            response_logits[masked].to(compute_dtype), targets[masked], reduction="none"
        )
    per_token = torch.zeros(masked.shape, dtype=torch.float64, device=logits.device)
    per_token = per_token.masked_scatter(masked, ce.double())
    return per_token.sum(-1) * response_length / num_masked


def choose(
    model: Callable[..., Tensor],
    prompt: Tensor,
    candidates: Sequence[Tensor],
    *,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    return_scores: bool = False,
) -> int | tuple[int, Tensor]:
    """Likelihood-based multiple choice: the index of the candidate with the highest ELBO.

    Every candidate is scored with the same random numbers (common random numbers), so equal-length
    candidates are compared on the same masks, which lowers the variance of their difference.
    Scores are raw log-likelihoods in nats (no length normalisation).

    Args:
        prompt: (P,) or (1, P) integer tokens.
        candidates: non-empty sequence of 1-D integer tensors (lengths may differ).
        return_scores: also return the (K,) float64 ELBO estimates.
    """
    fn = "choose"
    if not isinstance(prompt, torch.Tensor) or prompt.dim() not in (1, 2):
        raise ValueError(f"{fn}: prompt must be a (P,) or (1, P) tensor")
    prompt = prompt.reshape(1, -1)
    if isinstance(candidates, Tensor) or len(candidates) == 0:
        raise ValueError(f"{fn}: candidates must be a non-empty sequence of 1-D tensors")
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, Tensor) or candidate.dim() != 1:
            raise ValueError(f"{fn}: candidates[{index}] must be a 1-D tensor")
    if generator is None:
        seed = int(torch.randint(0, 2**62, ()))
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    start_state = generator.get_state()
    scores = []
    for candidate in candidates:
        generator.set_state(start_state)
        scores.append(
            elbo_log_likelihood(
                model,
                prompt,
                candidate.reshape(1, -1).to(prompt.device),
                mask_id=mask_id,
                mc_num=mc_num,
                batch_size=batch_size,
                generator=generator,
            )[0]
        )
    scores = torch.stack(scores)
    best = int(scores.argmax())
    return (best, scores) if return_scores else best
