"""Everything random in one training step, and MemDLM's simulated denoising trajectory.

The batch comes from the data sampler; the anchor (t, M_t) from the anchor stream; the rest
(the inner trajectory's masks, phi_0, the leak-free control's outer positions, or Standard's
extra anchors) from the inner stream, in that order (`Draws`, `draw_memdlm`). Drawing first
makes the rest of the step one deterministic, compile-clean function, and lets every rank of a
torchrun job draw the global step and keep its rows (`Draws.rows`).

From the anchor mask M_t, the "progressive memory consistent" (pmc) strategy builds a noisier
pre-anchor state whose mask is a superset of M_t, optionally evenly spaced intermediate states,
and ends at the anchor itself; each state is reached from the previous one by revealing tokens,
never by re-masking (memdlm-method.md section 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import NamedTuple

import torch

import diffusion as dd
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch

SCHEDULE = dd.LinearSchedule()  # alpha(t) = 1 - t, weight 1/t (LLaDA, MemDLM)


@dataclass
class Anchor:
    """The sampled noisy state x_t shared by the inner and the outer loop."""

    t: torch.Tensor  # (B,) float
    mask: torch.Tensor  # (B, L) bool, M_t
    xt: torch.Tensor  # (B, L) long


def sample_anchor(batch: Batch, *, mask_id: int, eps: float, generator) -> Anchor:
    """The anchor: t ~ U[eps, 1] per row, M_t ~ Bernoulli(t) over the maskable positions."""
    t = dd.sample_t(batch.x0.shape[0], eps=eps, antithetic=False, generator=generator)
    t = t.to(batch.x0.device)
    xt, mask = dd.corrupt(
        batch.x0,
        t,
        mask_id=mask_id,
        schedule=SCHEDULE,
        maskable=batch.maskable,
        generator=generator,
    )
    return Anchor(t, mask, xt)


class Generators(NamedTuple):
    """A phase's two random streams. The anchors (t, M_t) depend only on the seed and the
    step, so Standard and MemDLM runs with one seed see identical batches and anchor masks."""

    anchor: torch.Generator
    inner: torch.Generator


@dataclass
class Draws:
    """One step's draws. batch, anchor: the global batch and its x_t (both methods).

    MemDLM: per inner step its input mask, loss mask, look-ahead mask (`teacher_masks`; None =
    the clean x0) and the t of its 1/t weight (B,) float64; `anchor_index`, the inner step
    whose input is the anchor x_t itself (its early hidden states are the outer pass's), or
    None; phi_0 (`per_sample`: one per row); the leak-free control's outer positions O (None
    unless `leak_free`); `anchor_scores_outer`: the loss of the step at `anchor_index` scores
    exactly the outer loss's positions (M_t itself), so the two may share the tail's start on
    those rows (`losses.SharedRows`). Standard with more than one anchor per batch (the
    compute-matched control): the extras.
    """

    batch: Batch
    anchor: Anchor
    inputs: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    teachers: list[torch.Tensor | None] = field(default_factory=list)
    times: list[torch.Tensor] = field(default_factory=list)
    anchor_index: int | None = None
    phi0: dict[str, torch.Tensor] | None = None
    per_sample: bool = False
    outer: torch.Tensor | None = None
    extra_anchors: list[Anchor] = field(default_factory=list)
    anchor_scores_outer: bool = False

    def rows(self, rows: slice) -> Draws:
        """The rows that belong to one rank; a shared phi_0 (no batch dim) is every rank's."""

        def of(tensor):
            return None if tensor is None else tensor[rows]

        def anchor_of(a: Anchor) -> Anchor:
            return Anchor(a.t[rows], a.mask[rows], a.xt[rows])

        b, phi0 = self.batch, self.phi0
        if phi0 is not None and self.per_sample:
            phi0 = {k: v[rows] for k, v in phi0.items()}
        return replace(
            self,
            batch=Batch(b.x0[rows], b.maskable[rows], b.prompt_lengths[rows]),
            anchor=anchor_of(self.anchor),
            inputs=[of(m) for m in self.inputs],
            targets=[of(m) for m in self.targets],
            teachers=[of(m) for m in self.teachers],
            times=[of(t) for t in self.times],
            phi0=phi0,
            outer=of(self.outer),
            extra_anchors=[anchor_of(a) for a in self.extra_anchors],
        )


def draw_memdlm(batch: Batch, generators: Generators, cfg: MemDLMConfig, init_phi, *, mask_id, eps):
    """MemDLM's draws for one step: the anchor from the anchor stream, then `inner_draws`."""
    anchor = sample_anchor(batch, mask_id=mask_id, eps=eps, generator=generators.anchor)
    return inner_draws(batch, anchor, cfg, generators.inner, init_phi)


def inner_draws(batch: Batch, anchor: Anchor, cfg: MemDLMConfig, generator, init_phi) -> Draws:
    """MemDLM's draws after the anchor, from `generator`: the trajectory's masks, then phi_0
    (`init_phi(generator=generator)`), then (leak_free) the outer positions O, which every
    inner input and teacher input then masks and no inner loss scores. Also each step's weight
    time: `state_times` where the strategy names one, else the input's realised mask
    ratio (floored at 1e-6: a row with nothing masked has no loss terms)."""
    inputs = trajectory_masks(anchor.mask, batch.maskable, cfg, generator)
    teachers = teacher_masks(inputs, anchor.mask, cfg)
    targets = loss_masks(inputs, anchor.mask, cfg.inner_loss_mask, teachers)
    phi0 = init_phi(generator=generator)
    outer = None
    if cfg.leak_free:
        outer = outer_positions(anchor.mask, cfg.leak_free_fraction, generator)
        inputs, targets, teachers = without_outer(inputs, targets, teachers, outer)
    nominal = state_times(cfg, anchor.t, len(inputs))
    times = [
        (realised_ratio(m, batch.maskable) if t is None else t.double()).clamp(min=1e-6)
        for m, t in zip(inputs, nominal)
    ]
    # The last step's input is the anchor itself for pmc, anchor_only and no_progressive
    # (leak-free too: O lies inside M_t); pre_only and progressive_memory never reach it.
    tied = cfg.strategy not in ("pre_only", "progressive_memory")
    index = len(inputs) - 1 if tied else None
    steps = {"inputs": inputs, "targets": targets, "teachers": teachers, "times": times}
    # Known here, by construction, not by comparing values later (a host read).
    scores_outer = index is not None and outer is None and targets[index] is anchor.mask
    return Draws(batch, anchor, **steps, anchor_index=index, phi0=phi0,
                 per_sample=cfg.per_sample, outer=outer,
                 anchor_scores_outer=scores_outer)  # fmt: skip


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
