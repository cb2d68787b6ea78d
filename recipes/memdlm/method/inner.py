"""The inner loop: fast weights phi adapted on a simulated denoising trajectory.

memdlm-method.md sections 2.2-2.3 and 3.2: phi_0 (A random, B = 0), one first-order SGD step per
trajectory state through `bilevel.solve`, per-tensor clipping; at inference the same loop on the
prompt alone (`adapt_to_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import bilevel as bl
import diffusion as dd
import memory as mm
from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.method.losses import SCHEDULE, head_loss
from recipes.memdlm.method.split import Split, split_point
from recipes.memdlm.method.trajectory import loss_masks, realised_ratio, trajectory_masks


@dataclass
class InnerState:
    """One state of the simulated trajectory: the input, the loss mask and the weight time."""

    hidden: torch.Tensor  # (B, L, D) early-layer output for this state's input, detached
    loss_mask: torch.Tensor  # (B, L) bool
    ratio: torch.Tensor  # (B,) realised mask ratio of the input, the inner loss's t


def inner_optimizer(cfg: MemDLMConfig, per_sample: bool, grad_sync=None):
    """SGD on phi after a per-tensor gradient transform (clip at cfg.inner_clip, or g/||g||).

    grad_sync: an optional transform applied to the raw gradients first (the all-reduce of shared
    fast-weight gradients across data-parallel ranks, `distributed.inner_grad_sync`).
    """
    batch_dims = 1 if per_sample else 0
    if cfg.grad_transform == "clip":
        transform = bl.clip_per_tensor(cfg.inner_clip, batch_dims=batch_dims)
    else:
        transform = bl.normalize_per_tensor(batch_dims=batch_dims)
    first = () if grad_sync is None else (grad_sync,)
    return bl.chain(*first, transform, bl.sgd(cfg.inner_lr))


def make_fast_weights(model, cfg: MemDLMConfig):
    targets = adapter(model).fast_weight_targets(cfg.layer_fraction, tuple(cfg.targets))
    if cfg.fast_weights == "full":
        return mm.FullFastWeights(model, targets)
    return mm.FastLoRA(model, targets, rank=cfg.rank, alpha=cfg.alpha)


@dataclass(frozen=True)
class InnerProblem:
    """One batch's inner problem: the network after `split`, with fast weights `mem`, on rows x0.

    x0 (B, L) long; maskable (B, L) bool; per_sample: one phi per row (the losses are normalised
    per row); loss_backend: the fused loss's kernel or None (`method.losses.head_loss`).
    """

    model: Any
    mem: Any
    x0: torch.Tensor
    maskable: torch.Tensor
    split: Split
    per_sample: bool
    loss_backend: str | None = "auto"


def make_inner_loss(problem: InnerProblem, *, uniform: bool):
    """inner_loss(phi, meta, state) for bilevel.solve: the model after `split` with phi bound.

    Weighting: 1/r with r the state's realised mask ratio (training), or uniform (inference).
    Normalisation: mean over the state's loss-masked tokens, per row when per_sample (so each
    sample's fast weights see exactly the loss they would see alone). For the first-order inner
    loop only: the fused loss gets no gradient path to the output head's weight.
    """

    p = problem

    def inner_loss(phi, meta, state: InnerState) -> torch.Tensor:
        del meta  # the outer variables are the model's own parameters, closed over
        weight = torch.ones_like(state.ratio) if uniform else SCHEDULE.weight(state.ratio)
        if p.per_sample:  # sum_b (w_b / |M_b|) sum_{i in M_b} CE_bi
            weight = weight / state.loss_mask.sum(1).clamp(min=1)
        with p.mem.bind(phi):
            return head_loss(
                p.model,
                state.hidden,
                p.split,
                p.x0,
                state.loss_mask,
                state.ratio,
                p.maskable,
                normalize="sum" if p.per_sample else "masked",
                weight=weight,
                loss_backend=p.loss_backend,
                head_grad=False,  # first order: the inner gradient is taken for phi only
            )

    return inner_loss


@dataclass
class Adaptation:
    phi: dict[str, torch.Tensor]  # detached fast weights after the inner loop
    losses: list[float]  # inner loss at each step
    grad_norms: list[float]  # global norm of the raw inner gradient at each step
    max_tensor_norms: list[float]  # the largest per-tensor norm (what the clip compares)


def inner_states(
    problem: InnerProblem,
    input_masks: list[torch.Tensor],
    loss_masks_: list[torch.Tensor],
    *,
    mask_id: int,
    precomputed: dict[int, torch.Tensor] | None = None,
) -> list[InnerState]:
    """The inner steps' data: early hidden states (no gradient), loss masks and mask ratios.

    precomputed: {state index: early hidden states} already computed by the caller (the anchor's,
    shared with the outer pass); other states run the early layers here without gradient.
    """
    states = []
    for i, (input_mask, loss_mask) in enumerate(zip(input_masks, loss_masks_)):
        if precomputed is not None and i in precomputed:
            hidden = precomputed[i].detach()
        else:
            with torch.no_grad():
                x = torch.where(input_mask, mask_id, problem.x0)
                hidden = problem.split.early(problem.model, x)
        # A row with nothing masked has no loss terms; the floor only keeps t inside (0, 1].
        ratio = realised_ratio(input_mask, problem.maskable).clamp(min=1e-6)
        states.append(InnerState(hidden, loss_mask, ratio))
    return states


def init_fast_weights(model, mem, x0: torch.Tensor, *, per_sample: bool, generator):
    """phi_0: A random (drawn from `generator`), B = 0; one per sample when per_sample."""
    batch_size = x0.shape[0] if per_sample else None
    # float32 fast weights under bf16 models (accurate updates), float64 for float64 models.
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    return mem.init(batch_size=batch_size, generator=generator, device=x0.device, dtype=dtype)


def solve_inner(
    problem: InnerProblem,
    states: list[InnerState],
    phi0: dict[str, torch.Tensor],
    cfg: MemDLMConfig,
    *,
    uniform: bool = False,
    grad_sync=None,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The inner loop through `bilevel.solve` in first-order mode (compile-clean).

    Returns the detached adapted fast weights and solve's info dict (tensors). grad_sync: see
    `inner_optimizer`.
    """
    inner_loss = make_inner_loss(problem, uniform=uniform)
    with torch.enable_grad():  # the inner loop needs gradients even inside evaluation code
        phi, info = bl.solve(
            inner_loss,
            phi0,
            None,
            optimizer=inner_optimizer(cfg, problem.per_sample, grad_sync),
            steps=len(states),
            mode=bl.FirstOrder(),
            data=bl.PerStep(states),
            return_info=True,
            # Training skips such a step by its own policy (the inner losses in `info` say so);
            # elsewhere a non-finite inner loss stays bilevel's error.
            nonfinite=bl.NonFiniteReport() if allow_nonfinite else None,
        )
    return mm.detach(phi), info


def adapt(
    model,
    mem,
    x0: torch.Tensor,
    maskable: torch.Tensor,
    input_masks: list[torch.Tensor],
    loss_masks_: list[torch.Tensor],
    cfg: MemDLMConfig,
    *,
    mask_id: int,
    generator,
    per_sample: bool,
    uniform: bool = False,
    precomputed: dict[int, torch.Tensor] | None = None,
    loss_backend: str | None = "auto",
    allow_nonfinite: bool = False,
) -> Adaptation:
    """Run the inner loop through `bilevel.solve` in first-order mode.

    precomputed: {state index: early hidden states} already computed by the caller (the anchor's,
    shared with the outer pass); other states run the early layers here without gradient.
    """
    split = split_point(model, mem, cfg)
    problem = InnerProblem(model, mem, x0, maskable, split, per_sample, loss_backend)
    states = inner_states(
        problem, input_masks, loss_masks_, mask_id=mask_id, precomputed=precomputed
    )
    phi0 = init_fast_weights(model, mem, x0, per_sample=per_sample, generator=generator)
    phi, info = solve_inner(
        problem, states, phi0, cfg, uniform=uniform, allow_nonfinite=allow_nonfinite
    )
    largest = torch.stack(list(info["grad_norms"].values())).amax(0)
    return Adaptation(phi, info["loss"].tolist(), info["grad_norm"].tolist(), largest.tolist())


def adapt_on_trajectory(
    model,
    mem,
    x0: torch.Tensor,
    maskable: torch.Tensor,
    anchor_mask: torch.Tensor,
    cfg: MemDLMConfig,
    *,
    mask_id: int,
    generator,
    per_sample: bool,
    uniform: bool = False,
    anchor_hidden: torch.Tensor | None = None,
    loss_backend: str | None = "auto",
    allow_nonfinite: bool = False,
) -> Adaptation:
    """The inner loop on the simulated trajectory that ends at `anchor_mask` (B, L) bool: the
    trajectory's masks (`trajectory_masks`, from `generator`), their loss masks, then `adapt`.

    anchor_hidden: the anchor's early hidden states when the caller has them (training shares
    them with the outer pass); used for the trajectory's last state when it is the anchor.
    """
    inputs = trajectory_masks(anchor_mask, maskable, cfg, generator)
    targets = loss_masks(inputs, anchor_mask, cfg.inner_loss_mask)
    shared = anchor_hidden is not None and inputs[-1] is anchor_mask
    return adapt(
        model,
        mem,
        x0,
        maskable,
        inputs,
        targets,
        cfg,
        mask_id=mask_id,
        generator=generator,
        per_sample=per_sample,
        uniform=uniform,
        precomputed={len(inputs) - 1: anchor_hidden} if shared else None,
        loss_backend=loss_backend,
        allow_nonfinite=allow_nonfinite,
    )


def adapt_to_prompt(
    model,
    mem,
    prompt: torch.Tensor,
    cfg: MemDLMConfig,
    *,
    mask_id: int,
    generator,
    loss_backend: str | None = "auto",
) -> dict[str, torch.Tensor]:
    """Inference-time adaptation ("Train & Inference", memdlm-method.md section 3.2).

    Every prompt token is maskable. Anchor: Bernoulli(prompt_anchor_ratio); pre-anchor: its nested
    superset at s_pre times the realised ratio; two inner steps (the configured strategy) with
    uniform weighting and the mean over masked tokens. Fast weights are per prompt (per sample),
    exactly as if each prompt were adapted alone. Returns detached per-sample fast weights.
    """
    maskable = torch.ones_like(prompt, dtype=torch.bool)
    t = torch.full((prompt.shape[0],), cfg.prompt_anchor_ratio, device=prompt.device)
    _, anchor_mask = dd.corrupt(
        prompt, t, mask_id=mask_id, schedule=SCHEDULE, maskable=maskable, generator=generator
    )
    adaptation = adapt_on_trajectory(
        model,
        mem,
        prompt,
        maskable,
        anchor_mask,
        cfg,
        mask_id=mask_id,
        generator=generator,
        per_sample=True,
        uniform=True,
        loss_backend=loss_backend,
    )
    return adaptation.phi
