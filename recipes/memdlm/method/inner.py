"""The inner loop: fast weights phi adapted on a simulated denoising trajectory.

memdlm-method.md sections 2.2-2.3 and 3.2: phi_0 (A random, B = 0), one first-order SGD step per
trajectory state through `bilevel.solve`, per-tensor clipping; at inference the same loop on the
prompt alone (`adapt_to_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import bilevel as bl
import diffusion as dd
import memory as mm
from recipes.memdlm.allocator import keep_freed_memory
from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.method.losses import SCHEDULE, head_loss
from recipes.memdlm.method.split import Split, split_point
from recipes.memdlm.method.trajectory import (
    loss_masks,
    realised_ratio,
    state_times,
    teacher_masks,
    trajectory_masks,
)


@dataclass
class InnerState:
    """One state of the simulated trajectory: the input, the loss mask and the weight time."""

    hidden: torch.Tensor  # (B, L, D) early-layer output for this state's input, detached
    loss_mask: torch.Tensor  # (B, L) bool
    ratio: torch.Tensor  # (B,) the inner loss's t: the input's realised mask ratio by default
    # Distillation (`InnerProblem.inner_loss` != "ce"): the teacher's input, the state the step
    # looks ahead to (`trajectory.teacher_masks`; the clean x0 when there is none), as early
    # hidden states; and, for the early-layer hidden distillation, both inputs as tokens.
    teacher_hidden: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    teacher_tokens: torch.Tensor | None = None


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
    keep_freed_memory()  # a library caller's steps as the CLI's: no page-fault churn on CPU
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
    inner_loss: str = "ce"  # "ce", "distill", "distill_reverse", "distill_hidden"
    temperature: float = 1.0  # distill, distill_reverse
    hidden_type: str = "mse"  # distill_hidden: "mse" or "cosine"
    early_layers: int | None = None  # distill_hidden on the first `early_layers` layers


def objective_options(model, cfg: MemDLMConfig) -> dict[str, Any]:
    """InnerProblem's inner-objective fields from the configuration."""
    early = None
    if cfg.inner_loss == "distill_hidden" and cfg.distill_hidden_layers == "early":
        if not (hasattr(model, "hidden_states") and hasattr(model, "norm")):
            raise ValueError(
                "memdlm.distill_hidden_layers='early' needs a backbone with hidden_states(x, "
                f"upto=) and a final norm (the reference Transformer); got {type(model).__name__}"
            )
        early = max(1, int(adapter(model).num_layers() * cfg.layer_fraction))
    return {
        "inner_loss": cfg.inner_loss,
        "temperature": cfg.distill_temperature,
        "hidden_type": cfg.distill_hidden_type,
        "early_layers": early,
    }


def token_divergence(student, teacher, kind: str, temperature: float = 1.0, hidden_type="mse"):
    """Per-token inner distillation loss (B, L), at least float32 (the reference code's definitions,
    `memdlm/memory.py` `_compute_*distill_loss`):

    distill:          KL(p_T || p_S) = sum_v p_T (log p_T - log p_S), p = softmax(z / tau)
    distill_reverse:  KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
    distill_hidden:   mse: mean_d (h_S - h_T)^2;  cosine: 1 - <h_S, h_T> / (|h_S| |h_T|)
    """
    dtype = torch.promote_types(student.dtype, torch.float32)  # at least float32
    student, teacher = student.to(dtype), teacher.to(dtype)
    if kind == "distill_hidden":
        if hidden_type == "cosine":
            return 1.0 - (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(-1)
        diff = student - teacher  # by hand: no F.mse_loss (DESIGN, environment facts)
        return (diff * diff).mean(-1)
    log_s = torch.log_softmax(student / temperature, dim=-1)
    log_t = torch.log_softmax(teacher / temperature, dim=-1)
    if kind == "distill":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "distill_reverse":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    raise ValueError(f"inner loss {kind!r}: expected distill, distill_reverse or distill_hidden")


def make_inner_loss(problem: InnerProblem, *, uniform: bool):
    """inner_loss(phi, meta, state) for bilevel.solve: the model after `split` with phi bound.

    Weighting: 1/r with r the state's realised mask ratio (training), or uniform (inference).
    Normalisation: mean over the state's loss-masked tokens, per row when per_sample (so each
    sample's fast weights see exactly the loss they would see alone). For the first-order inner
    loop only: the fused loss gets no gradient path to the output head's weight.
    The distillation objectives (`token_divergence`) replace the cross-entropy by a divergence
    from the teacher: the same network with the same phi, without gradient, on the state the
    step looks ahead to; same weighting and normalisation.
    """

    p = problem

    def inner_loss(phi, meta, state: InnerState) -> torch.Tensor:
        del meta  # the outer variables are the model's own parameters, closed over
        weight = torch.ones_like(state.ratio) if uniform else SCHEDULE.weight(state.ratio)
        if p.per_sample:  # sum_b (w_b / |M_b|) sum_{i in M_b} CE_bi
            weight = weight / state.loss_mask.sum(1).clamp(min=1)
        if p.inner_loss != "ce":
            return _distill_loss(p, phi, state, weight)
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


def _distill_outputs(p: InnerProblem, hidden, tokens):
    """What the distillation compares: logits, final features, or the early layers' features."""
    if p.inner_loss != "distill_hidden":
        return p.split.logits(p.model, hidden)
    if p.early_layers is None:
        return p.split.features(p.model, hidden)
    return p.model.norm(p.model.hidden_states(tokens, upto=p.early_layers))


def _distill_loss(p: InnerProblem, phi, state: InnerState, weight) -> torch.Tensor:
    with p.mem.bind(phi):
        with torch.no_grad():
            teacher = _distill_outputs(p, state.teacher_hidden, state.teacher_tokens)
        student = _distill_outputs(p, state.hidden, state.tokens)
    per_token = token_divergence(
        student, teacher.detach(), p.inner_loss, p.temperature, p.hidden_type
    )
    mask = state.loss_mask.to(per_token.dtype)
    total = (per_token * mask * weight.to(per_token.dtype)[:, None]).sum()
    return total if p.per_sample else total / mask.sum().clamp(min=1)


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
    teachers: list[torch.Tensor | None] | None = None,
    times: list[torch.Tensor | None] | None = None,
) -> list[InnerState]:
    """The inner steps' data: early hidden states (no gradient), loss masks and mask ratios.

    precomputed: {state index: early hidden states} already computed by the caller (the anchor's,
    shared with the outer pass); other states run the early layers here without gradient.
    teachers: each step's look-ahead mask (`trajectory.teacher_masks`), used by the
    distillation objectives only. times: each step's t where it is not the realised ratio
    (`trajectory.state_times`).
    """
    # Early hidden states by mask object, found by identity (not id(): compile-clean).
    cache: list[tuple[torch.Tensor | None, torch.Tensor]] = []

    def early(mask: torch.Tensor | None) -> torch.Tensor:
        for known, hidden in cache:
            if known is mask:
                return hidden
        with torch.no_grad():
            hidden = problem.split.early(problem.model, tokens_of(mask))
        cache.append((mask, hidden))
        return hidden

    def tokens_of(mask: torch.Tensor | None) -> torch.Tensor:
        return problem.x0 if mask is None else torch.where(mask, mask_id, problem.x0)

    states = []
    for i, (input_mask, loss_mask) in enumerate(zip(input_masks, loss_masks_)):
        if precomputed is not None and i in precomputed:
            hidden = precomputed[i].detach()
            cache.append((input_mask, hidden))
        else:
            hidden = early(input_mask)
        # A row with nothing masked has no loss terms; the floor only keeps t inside (0, 1].
        ratio = realised_ratio(input_mask, problem.maskable).clamp(min=1e-6)
        if times is not None and times[i] is not None:
            ratio = times[i].to(ratio.dtype).clamp(min=1e-6)
        state = InnerState(hidden, loss_mask, ratio)
        if problem.inner_loss != "ce":
            teacher = teachers[i] if teachers is not None else None
            state.teacher_hidden = early(teacher)
            if problem.early_layers is not None:
                state.tokens, state.teacher_tokens = tokens_of(input_mask), tokens_of(teacher)
        states.append(state)
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
    teachers: list[torch.Tensor | None] | None = None,
    times: list[torch.Tensor | None] | None = None,
) -> Adaptation:
    """Run the inner loop through `bilevel.solve` in first-order mode.

    precomputed: {state index: early hidden states} already computed by the caller (the anchor's,
    shared with the outer pass); other states run the early layers here without gradient.
    teachers, times: see `inner_states`.
    """
    split = split_point(model, mem, cfg)
    problem = InnerProblem(
        model, mem, x0, maskable, split, per_sample, loss_backend, **objective_options(model, cfg)
    )
    states = inner_states(
        problem,
        input_masks,
        loss_masks_,
        mask_id=mask_id,
        precomputed=precomputed,
        teachers=teachers,
        times=times,
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
    anchor_t: torch.Tensor | None = None,
) -> Adaptation:
    """The inner loop on the simulated trajectory that ends at `anchor_mask` (B, L) bool: the
    trajectory's masks (`trajectory_masks`, from `generator`), their loss masks, then `adapt`.

    anchor_hidden: the anchor's early hidden states when the caller has them (training shares
    them with the outer pass); used for the trajectory's last state when it is the anchor.
    anchor_t: the anchor's sampled t (no_progressive weights its step by it; default: the
    realised ratio).
    """
    inputs = trajectory_masks(anchor_mask, maskable, cfg, generator)
    teachers = teacher_masks(inputs, anchor_mask, cfg)
    targets = loss_masks(inputs, anchor_mask, cfg.inner_loss_mask, teachers)
    times = None if anchor_t is None else state_times(cfg, anchor_t, len(inputs))
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
        teachers=teachers,
        times=times,
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
