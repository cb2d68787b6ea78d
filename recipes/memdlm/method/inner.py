"""The inner loop: fast weights phi adapted on a simulated denoising trajectory.

memdlm-method.md sections 2.2-2.3 and 3.2: phi_0 (A random, B = 0), one first-order SGD step per
trajectory state through `bilevel.solve`, per-tensor clipping. `adapt` is the inner half of the
MemDLM step, and the only inner loop: training (`step.MemDLM.loss`), the answer-adapted
evaluation and prompt adaptation all call it on the step's draws (`trajectory.inner_draws`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import bilevel as bl
import memory as mm
from recipes.memdlm.allocator import keep_freed_memory
from recipes.memdlm.backbones import Backbone, resolve
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.method.distill import distill_loss
from recipes.memdlm.method.losses import SharedRows, head_loss
from recipes.memdlm.method.split import Split
from recipes.memdlm.method.trajectory import SCHEDULE, Draws


@dataclass
class InnerState:
    """One state of the simulated trajectory: the input, the loss mask and the weight time."""

    # (B, L, D) early-layer output for this state's input, detached (but with `shared`)
    hidden: torch.Tensor
    loss_mask: torch.Tensor  # (B, L) bool
    ratio: torch.Tensor  # (B,) the inner loss's t (`Draws.times`)
    # The first inner step: phi is phi_0, `init`'s (LoRA B = 0), where the fast weights' forward
    # correction and A's gradient are exactly zero and are skipped (`mm.FastWeights.bind`).
    at_init: bool = False
    # The anchor's scored rows shared with the outer loss (`losses.SharedRows`); `hidden` is
    # then the outer pass's own, with its graph, so that the rows' shared start can carry it
    # (the inner gradient is taken for phi only: that graph is never run backward here).
    shared: SharedRows | None = None
    # Distillation (`InnerProblem.inner_loss` != "ce"): the teacher's input, the state the step
    # looks ahead to (`trajectory.teacher_masks`; the clean x0 when there is none), as early
    # hidden states; and, for the early-layer hidden distillation, both inputs as tokens.
    teacher_hidden: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    teacher_tokens: torch.Tensor | None = None


def inner_optimizer(cfg: MemDLMConfig, per_sample: bool, grad_sync=None):
    """SGD on phi after a per-tensor gradient transform (clip at cfg.inner_clip, or g/||g||).

    grad_sync: an optional transform applied to the raw gradients first (the all-reduce of shared
    fast-weight gradients across data-parallel ranks, `loop.parallel.InnerSync`).
    """
    batch_dims = 1 if per_sample else 0
    if cfg.grad_transform == "clip":
        transform = bl.clip_per_tensor(cfg.inner_clip, batch_dims=batch_dims)
    else:
        transform = bl.normalize_per_tensor(batch_dims=batch_dims)
    first = () if grad_sync is None else (grad_sync,)
    return bl.chain(*first, transform, bl.sgd(cfg.inner_lr))


def make_fast_weights(model, cfg: MemDLMConfig):
    """Fast weights on a model (or its `Backbone`'s module) as the configuration places them."""
    keep_freed_memory()  # a library caller's steps as the CLI's: no page-fault churn on CPU
    backbone = resolve(model)
    targets = backbone.fast_weight_targets(cfg.layer_fraction, tuple(cfg.targets))
    if cfg.fast_weights == "full":
        return mm.FullFastWeights(backbone.module, targets)
    return mm.FastLoRA(backbone.module, targets, rank=cfg.rank, alpha=cfg.alpha)


def fast_weight_dtype(backbone: Backbone) -> torch.dtype:
    """float32 fast weights under bf16 models (accurate updates), float64 for float64 models."""
    return torch.promote_types(next(backbone.module.parameters()).dtype, torch.float32)


@dataclass(frozen=True)
class InnerProblem:
    """One batch's inner problem: the network after `split`, with fast weights `mem`, on rows x0.

    x0 (B, L) long; maskable (B, L) bool; per_sample: one phi per row (the losses are normalised
    per row); loss_backend: the fused loss's kernel or None (`method.losses.head_loss`);
    uniform: weight every state's tokens by 1 (prompt adaptation) instead of 1/t.
    """

    split: Split
    mem: Any
    x0: torch.Tensor
    maskable: torch.Tensor
    per_sample: bool
    loss_backend: str | None = "auto"
    uniform: bool = False
    inner_loss: str = "ce"  # "ce", "distill", "distill_reverse", "distill_hidden"
    temperature: float = 1.0  # distill, distill_reverse
    hidden_type: str = "mse"  # distill_hidden: "mse" or "cosine"
    early_layers: int | None = None  # distill_hidden on the first `early_layers` layers


def objective_options(backbone: Backbone, cfg: MemDLMConfig) -> dict[str, Any]:
    """InnerProblem's inner-objective fields from the configuration."""
    early = None
    if cfg.inner_loss == "distill_hidden" and cfg.distill_hidden_layers == "early":
        module = backbone.module
        if not (hasattr(module, "hidden_states") and hasattr(module, "norm")):
            raise ValueError(
                "memdlm.distill_hidden_layers='early' needs a backbone with hidden_states(x, "
                f"upto=) and a final norm (the reference Transformer); got {type(module).__name__}"
            )
        early = max(1, int(backbone.num_layers() * cfg.layer_fraction))
    return {
        "inner_loss": cfg.inner_loss,
        "temperature": cfg.distill_temperature,
        "hidden_type": cfg.distill_hidden_type,
        "early_layers": early,
    }


def make_inner_loss(problem: InnerProblem):
    """inner_loss(phi, meta, state) for bilevel.solve: the model after `split` with phi bound.

    Weighting: 1/t with t the state's weight time (training), or uniform (`problem.uniform`).
    Normalisation: mean over the state's loss-masked tokens, per row when per_sample (so each
    sample's fast weights see exactly the loss they would see alone). For the first-order inner
    loop only: the fused loss gets no gradient path to the output head's weight.
    The distillation objectives (`distill.distill_loss`) replace the cross-entropy by a
    divergence from a teacher; same weighting and normalisation.
    """

    p = problem

    def inner_loss(phi, meta, state: InnerState) -> torch.Tensor:
        del meta  # the outer variables are the model's own parameters, closed over
        weight = torch.ones_like(state.ratio) if p.uniform else SCHEDULE.weight(state.ratio)
        if p.per_sample:  # sum_b (w_b / |M_b|) sum_{i in M_b} CE_bi
            weight = weight / state.loss_mask.sum(1).clamp(min=1)
        if p.inner_loss != "ce":
            return distill_loss(p, phi, state, weight)
        with p.mem.bind(phi, at_init=state.at_init):
            return head_loss(
                p.split,
                state.hidden,
                p.x0,
                state.loss_mask,
                state.ratio,
                p.maskable,
                normalize="sum" if p.per_sample else "masked",
                weight=weight,
                loss_backend=p.loss_backend,
                head_grad=False,  # first order: the inner gradient is taken for phi only
                per_sample=p.per_sample,
                shared=state.shared,
            )

    return inner_loss


def inner_states(
    problem: InnerProblem,
    draws: Draws,
    *,
    mask_id: int,
    anchor_hidden: torch.Tensor | None = None,
    shared: SharedRows | None = None,
) -> list[InnerState]:
    """The inner steps' data: early hidden states (no gradient), loss masks and weight times.

    anchor_hidden: the anchor's early hidden states when the caller has them (training shares
    them with the outer pass), used at `draws.anchor_index`; every other input runs the early
    layers here without gradient, once per distinct mask object (an epoch repeats its states).
    shared: the anchor's scored rows shared with the outer loss (`SharedRows`), for the step at
    `draws.anchor_index` (with anchor_hidden, when `draws.anchor_scores_outer`).
    """
    cache: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # by object: compile-clean

    def early(mask: torch.Tensor | None) -> torch.Tensor:
        for known, hidden in cache:
            if known is mask:
                return hidden
        with torch.no_grad():
            hidden = problem.split.early(tokens_of(mask))
        cache.append((mask, hidden))
        return hidden

    def tokens_of(mask: torch.Tensor | None) -> torch.Tensor:
        return problem.x0 if mask is None else torch.where(mask, mask_id, problem.x0)

    states = []
    steps = zip(draws.inputs, draws.targets, draws.teachers, draws.times)
    for i, (input_mask, loss_mask, teacher, time) in enumerate(steps):
        share = None
        if i == draws.anchor_index and anchor_hidden is not None:
            hidden = anchor_hidden.detach()
            cache.append((input_mask, hidden))
            if shared is not None and draws.anchor_scores_outer:
                hidden, share = anchor_hidden, shared
        else:
            hidden = early(input_mask)
        state = InnerState(hidden, loss_mask, time, at_init=i == 0, shared=share)  # at phi0
        if problem.inner_loss != "ce":
            state.teacher_hidden = early(teacher)
            if problem.early_layers is not None:
                state.tokens, state.teacher_tokens = tokens_of(input_mask), tokens_of(teacher)
        states.append(state)
    return states


def solve_inner(
    problem: InnerProblem,
    states: list[InnerState],
    phi0: dict[str, torch.Tensor],
    optimizer: bl.GradientTransformation,
    *,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, torch.Tensor], bl.SolveInfo]:
    """The inner loop through `bilevel.solve_with_info` in first-order mode (compile-clean).

    Returns the detached adapted fast weights and solve's `SolveInfo` (tensors). optimizer:
    `inner_optimizer`'s.
    """
    with torch.enable_grad():  # the inner loop needs gradients even inside evaluation code
        phi, info = bl.solve_with_info(
            make_inner_loss(problem),
            phi0,
            None,
            optimizer=optimizer,
            steps=len(states),
            mode=bl.FirstOrder(),
            data=bl.PerStep(states),
            # Training skips a step whose inner loss is not finite by its own policy, read
            # back with the step's record (`info.loss`), so solve reads nothing back here;
            # elsewhere a non-finite inner loss stays bilevel's error.
            check_finite=not allow_nonfinite,
        )
    return mm.detach(phi), info


def adapt(
    problem: InnerProblem,
    draws: Draws,
    optimizer: bl.GradientTransformation,
    *,
    mask_id: int,
    anchor_hidden: torch.Tensor | None = None,
    shared: SharedRows | None = None,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The inner half of the MemDLM step: from the step's draws to the adapted phi.

    Returns (detached phi, solve's info: inner losses and gradient norms per step, tensors).
    optimizer: `inner_optimizer`'s; anchor_hidden, shared: see `inner_states`.
    """
    states = inner_states(
        problem, draws, mask_id=mask_id, anchor_hidden=anchor_hidden, shared=shared
    )
    return solve_inner(problem, states, draws.phi0, optimizer, allow_nonfinite=allow_nonfinite)
