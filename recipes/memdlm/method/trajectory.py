"""MemDLM's simulated denoising trajectory: the nested masks of the inner steps.

From the anchor mask M_t, the "progressive memory consistent" (pmc) strategy builds a noisier
pre-anchor state whose mask is a superset of M_t, optionally evenly spaced intermediate states,
and ends at the anchor itself; each state is reached from the previous one by revealing tokens,
never by re-masking (memdlm-method.md section 2.2).
"""

from __future__ import annotations

from fractions import Fraction

import torch

import diffusion as dd
from recipes.memdlm.config import MemDLMConfig


def realised_ratio(mask: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Realised mask ratio per row (float64): the inner loss's 1/r weight."""
    return mask.sum(1).double() / maskable.sum(1).clamp(min=1).double()


def pre_anchor_count(n_anchor: torch.Tensor, n_maskable: torch.Tensor, s_pre: float):
    """Masked positions of the pre-anchor state, min(n, max(m, floor(s_pre * m))), per row.

    n_anchor (B,) long: m, the anchor's masked count; n_maskable (B,) long: n. Computed in
    integers with s_pre as the decimal fraction it is written as (1.5 -> 3/2): the float form
    floor(n * float(s_pre * m / n)) is one token short for some (n, m), e.g. 4.7% of the pairs
    with n <= 4096 at s_pre = 1.5.
    """
    ratio = Fraction(str(s_pre)).limit_denominator(10**6)
    scaled = torch.div(n_anchor * ratio.numerator, ratio.denominator, rounding_mode="floor")
    return torch.minimum(n_maskable, torch.maximum(n_anchor, scaled))


def _nested_exact(mask, count, within, generator) -> torch.Tensor:
    """A superset of `mask` inside `within` with exactly `count` (B,) masked positions per row."""
    n_within = within.sum(1).clamp(min=1)
    # nested_mask takes floor(n * ratio); the half-token offset makes the floor land on `count`.
    ratio = (count.to(torch.float64) + 0.5) / n_within
    return dd.nested_mask(mask, ratio, maskable=within, generator=generator)


def _pmc_states(anchor_mask, maskable, pre, cfg, generator) -> list[torch.Tensor]:
    """pmc from its pre-anchor state: evenly spaced reveals down to the anchor (K states)."""
    masks = [pre]
    n_anchor = anchor_mask.sum(1)
    for steps_left in range(cfg.inner_steps - 1, 1, -1):
        current = masks[-1]
        reveal = torch.ceil((current.sum(1) - n_anchor) / steps_left).long()
        masks.append(_nested_exact(anchor_mask, current.sum(1) - reveal, current, generator))
    return [*masks, anchor_mask]


def progressive_ratios(cfg: MemDLMConfig) -> list[float]:
    """progressive_memory's nominal mask ratio of each state, 0.8 linearly down to the
    prompt_anchor_ratio (the reference code's prompt_mask_ratio); K = 1: that ratio alone."""
    k = cfg.inner_steps
    if k == 1:
        return [cfg.prompt_anchor_ratio]
    return [0.8 + (cfg.prompt_anchor_ratio - 0.8) * step / (k - 1) for step in range(k)]


def _progressive_states(first, maskable, cfg, generator) -> list[torch.Tensor]:
    """progressive_memory from its first state: each next state reveals random masked
    positions until at most floor(n * ratio_next) stay masked (reference: memory.py, adapt)."""
    masks = [first]
    n = maskable.sum(1).double()
    for ratio in progressive_ratios(cfg)[1:]:
        current = masks[-1]
        target = torch.floor(n * ratio).long()
        keep = torch.minimum(current.sum(1), target)
        masks.append(_nested_exact(torch.zeros_like(current), keep, current, generator))
    return masks


def trajectory_masks(
    anchor_mask: torch.Tensor,
    maskable: torch.Tensor,
    cfg: MemDLMConfig,
    generator,
) -> list[torch.Tensor]:
    """Input masks of the inner steps, in order, for all `inner_epochs` passes.

    pmc: pre-anchor (exact count min(n, max(m, floor(s_pre m))), `pre_anchor_count`), then for K > 2
    evenly spaced reveals of ceil(remaining / steps_left) positions, then the anchor itself
    (K = 1 is the anchor alone); each state a superset of the next. pre_only: the pre-anchor
    state alone; anchor_only and no_progressive: the anchor. progressive_memory: not tied to the
    anchor: a Bernoulli(0.8) mask of the maskable positions (K = 1: Bernoulli(prompt_anchor_ratio)),
    then random reveals down to floor(n * ratio_k) masked (`progressive_ratios`).
    Each later epoch starts again from the same first state and draws its reveals anew (the
    reference code's num_inner_epochs); with K = 2 pmc it repeats the same two states.
    """
    if cfg.strategy == "progressive_memory":
        ratio = progressive_ratios(cfg)[0]
        noise = torch.rand(maskable.shape, generator=generator, device=maskable.device)
        first = (noise < ratio) & maskable
        masks = []
        for _ in range(cfg.inner_epochs):
            masks += _progressive_states(first, maskable, cfg, generator)
        return masks
    if cfg.strategy in ("anchor_only", "no_progressive") or (
        cfg.strategy == "pmc" and cfg.inner_steps == 1
    ):
        return [anchor_mask] * cfg.inner_epochs
    count = pre_anchor_count(anchor_mask.sum(1), maskable.sum(1), cfg.s_pre)
    pre = _nested_exact(anchor_mask, count, maskable, generator)
    if cfg.strategy == "pre_only":
        return [pre] * cfg.inner_epochs
    masks = []
    for _ in range(cfg.inner_epochs):
        masks += _pmc_states(anchor_mask, maskable, pre, cfg, generator)
    return masks


def teacher_masks(
    inputs: list[torch.Tensor], anchor_mask: torch.Tensor, cfg: MemDLMConfig
) -> list[torch.Tensor | None]:
    """The state each inner step looks ahead to (None: the clean x0), as the reference code's
    `next_masked`: the next state of the same epoch; nothing after an epoch's last state;
    the anchor for pre_only; nothing for anchor_only and no_progressive. It is the teacher's
    input of the distillation losses and what "newly_revealed" subtracts."""
    if cfg.strategy == "pre_only":
        return [anchor_mask] * len(inputs)
    per_epoch = len(inputs) // cfg.inner_epochs
    return [inputs[i + 1] if (i + 1) % per_epoch else None for i in range(len(inputs))]


def state_times(
    cfg: MemDLMConfig, anchor_t: torch.Tensor, n_states: int
) -> list[torch.Tensor | None]:
    """The time t of each inner state's 1/t weight when it is not the state's realised mask
    ratio (None): the anchor's sampled t for no_progressive, the nominal ratios for
    progressive_memory (as the reference code's `t`)."""
    if cfg.strategy == "no_progressive":
        return [anchor_t] * n_states
    if cfg.strategy == "progressive_memory":
        ratios = progressive_ratios(cfg) * cfg.inner_epochs
        return [torch.full_like(anchor_t, r) for r in ratios]
    return [None] * n_states


def loss_masks(
    inputs: list[torch.Tensor],
    anchor_mask,
    mode: str,
    teachers: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """What each inner step predicts: every masked input position ("student_masked", the code's
    default), or only those its look-ahead state reveals ("newly_revealed", paper Eq. 7): the
    input mask minus the teacher's (`teacher_masks`; default: the next input, none after the
    last)."""
    if mode == "student_masked":
        return inputs
    if teachers is None:
        teachers = [*inputs[1:], None]
    return [
        current if following is None else current & ~following
        for current, following in zip(inputs, teachers)
    ]


def outer_positions(anchor_mask: torch.Tensor, fraction: float, generator) -> torch.Tensor:
    """The leak-free control's outer targets O: each anchor-masked position with probability
    `fraction` (B, L) bool."""
    noise = torch.rand(anchor_mask.shape, generator=generator, device=anchor_mask.device)
    return anchor_mask & (noise < fraction)


def without_outer(
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    teachers: list[torch.Tensor | None],
    outer: torch.Tensor,
):
    """The inner steps of the leak-free control: every input and teacher input masks O, no
    inner loss scores O. An input that already masks O (the anchor: O lies inside M_t) keeps
    its values."""
    inputs = [m | outer for m in inputs]
    targets = [m & ~outer for m in targets]
    teachers = [outer if m is None else m | outer for m in teachers]
    return inputs, targets, teachers
