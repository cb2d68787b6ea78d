"""The two training objectives: the standard masked-diffusion loss and the MemDLM step.

MemDLM (arXiv 2603.22241; memdlm-method.md section 2.4) for one batch:

1. Sample the anchor: t ~ U[eps, 1] per row, M_t ~ Bernoulli(t) over the response, x_t.
2. Reset fast weights phi (LoRA on the FFN of the last layers; A random, B = 0).
3. Simulate a short denoising trajectory ending at the anchor ("pmc", K=2): a noisier
   pre-anchor state whose mask is a superset of M_t with ratio ~ s_pre * r, then x_t itself.
   Take one SGD step on phi per state (per-tensor gradient clipping), first-order.
4. Outer loss: the ordinary masked-diffusion loss on the same x_t with phi bound as constants;
   its gradient trains the base model theta only.

Efficiency: layers before the first fast-weight layer do not depend on phi, so they run once per
state without gradient, and the anchor's early hidden states are shared with the outer pass. With
fast weights only on the FFN of that layer (the default), its attention sub-block is part of the
shared early computation too (`Split`).
With the reference Transformer, the losses go through `dd.masked_diffusion_loss_from_hidden`
(`model.norm` output and `model.lm_head.weight`): only the masked rows are projected, and the
(B, L, V) logits are never formed (`loss_backend`, docs/kernels.md). `memdlm_core` and
`standard_loss` are the compile-clean parts of the steps (`compile_steps`): everything that draws
from a generator or reads values back to Python stays outside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch
from recipes.memdlm.method.inner import (
    InnerProblem,
    adapt_on_trajectory,
    init_fast_weights,
    inner_states,
    objective_options,
    solve_inner,
)
from recipes.memdlm.method.losses import SCHEDULE, Anchor, StepOutput, head_loss, standard_loss
from recipes.memdlm.method.split import split_point
from recipes.memdlm.method.trajectory import (
    loss_masks,
    outer_positions,
    state_times,
    teacher_masks,
    trajectory_masks,
    without_outer,
)


@dataclass
class InnerDraws:
    """The random draws of one MemDLM step after its anchor (in the order they are drawn)."""

    inputs: list[torch.Tensor]  # inner-step input masks
    targets: list[torch.Tensor]  # inner-step loss masks
    teachers: list[torch.Tensor | None]  # look-ahead masks (distillation, newly_revealed)
    phi0: dict[str, torch.Tensor]
    outer: torch.Tensor | None  # the leak-free control's outer positions O, else None


def draw_inner(model, mem, batch: Batch, anchor: Anchor, cfg: MemDLMConfig, generator):
    """Trajectory masks, then phi_0, then (leak_free) the outer positions, from `generator`."""
    inputs = trajectory_masks(anchor.mask, batch.maskable, cfg, generator)
    teachers = teacher_masks(inputs, anchor.mask, cfg)
    targets = loss_masks(inputs, anchor.mask, cfg.inner_loss_mask, teachers)
    phi0 = init_fast_weights(model, mem, batch.x0, per_sample=cfg.per_sample, generator=generator)
    outer = None
    if cfg.leak_free:
        outer = outer_positions(anchor.mask, cfg.leak_free_fraction, generator)
        inputs, targets, teachers = without_outer(inputs, targets, teachers, outer)
    return InnerDraws(inputs, targets, teachers, phi0, outer)


def outer_losses(
    model, mem, phi, hidden_t, split, batch, anchor, log_gap, loss_backend, outer=None, cfg=None
):
    """The outer loss with phi bound, and (log_gap) the same loss with fast weights off.

    outer: the leak-free control's positions O (None: all of M_t); the loss then scores O only,
    with weight 1 / (t q), q = cfg.leak_free_fraction, so that its expectation over O is the
    standard loss.
    """
    mask, weight = anchor.mask, None
    if outer is not None:
        mask = outer
        weight = SCHEDULE.weight(anchor.t) / cfg.leak_free_fraction

    def loss_of(hidden):
        return head_loss(
            model,
            hidden,
            split,
            batch.x0,
            mask,
            anchor.t,
            batch.maskable,
            normalize="token",
            weight=weight,
            loss_backend=loss_backend,
        )

    with mem.bind(phi):
        loss = loss_of(hidden_t)
    off = None
    if log_gap:
        with torch.no_grad():
            off = loss_of(hidden_t.detach())
    return loss, off


def step_metrics(loss, off, losses, grad_norms, max_tensor_norms) -> dict[str, float]:
    metrics = {"loss": loss.item()}
    for k, (value, norm, largest) in enumerate(zip(losses, grad_norms, max_tensor_norms), 1):
        metrics[f"inner_loss_{k}"] = value
        metrics[f"inner_grad_norm_{k}"] = norm
        metrics[f"inner_max_tensor_norm_{k}"] = largest
    if not all(math.isfinite(value) for value in losses):
        metrics["inner_nonfinite"] = True  # phi is not finite: the outer loss is skipped too
        metrics["loss"] = math.nan
    if off is not None:
        metrics["loss_off"] = off.item()
        metrics["gap"] = off.item() - loss.item()
    return metrics


def memdlm_core(
    model,
    mem,
    batch: Batch,
    anchor: Anchor,
    input_masks: list[torch.Tensor],
    loss_masks_: list[torch.Tensor],
    phi0: dict[str, torch.Tensor],
    cfg: MemDLMConfig,
    mask_id: int,
    log_gap: bool,
    loss_backend: str | None = "auto",
    grad_sync=None,
    teachers: list[torch.Tensor | None] | None = None,
    outer: torch.Tensor | None = None,
):
    """The MemDLM step from drawn masks and phi_0 (compile-clean: no generator, no `.item()`).

    Returns (loss, loss with fast weights off or None, inner info dict of tensors). grad_sync:
    see `inner_optimizer` (data-parallel training with shared fast weights). teachers: the
    look-ahead masks (`trajectory.teacher_masks`; needed by the distillation objectives).
    outer: the leak-free control's outer positions (`InnerDraws.outer`).
    """
    split = split_point(model, mem, cfg)
    hidden_t = split.early(model, anchor.xt)  # with grad: reused by the outer pass
    anchor_index = {len(input_masks) - 1: hidden_t} if input_masks[-1] is anchor.mask else {}
    problem = InnerProblem(
        model,
        mem,
        batch.x0,
        batch.maskable,
        split,
        cfg.per_sample,
        loss_backend,
        **objective_options(model, cfg),
    )
    states = inner_states(
        problem,
        input_masks,
        loss_masks_,
        mask_id=mask_id,
        precomputed=anchor_index,
        teachers=teachers,
        times=state_times(cfg, anchor.t, len(input_masks)),
    )
    phi, info = solve_inner(problem, states, phi0, cfg, grad_sync=grad_sync, allow_nonfinite=True)
    loss, off = outer_losses(
        model, mem, phi, hidden_t, split, batch, anchor, log_gap, loss_backend, outer, cfg
    )
    return loss, off, info


def memdlm_step(
    model,
    mem,
    batch: Batch,
    anchor: Anchor,
    cfg: MemDLMConfig,
    *,
    mask_id: int,
    generator,
    log_gap: bool,
    loss_backend: str | None = "auto",
    compiled: dict[str, Callable] | None = None,
) -> StepOutput:
    """One MemDLM training step (without the optimizer update). See the module docstring.

    compiled: from `compile_steps`; the masks and phi_0 are then drawn here and the rest of the
    step runs as one compiled graph (`memdlm_core`). None = eager.
    """
    if compiled is not None or cfg.leak_free:
        draws = draw_inner(model, mem, batch, anchor, cfg, generator)
        core = compiled["memdlm"] if compiled is not None else memdlm_core
        loss, off, info = core(
            model,
            mem,
            batch,
            anchor,
            draws.inputs,
            draws.targets,
            draws.phi0,
            cfg,
            mask_id,
            log_gap,
            loss_backend,
            teachers=draws.teachers,
            outer=draws.outer,
        )
        largest = torch.stack(list(info["grad_norms"].values())).amax(0)
        metrics = step_metrics(
            loss, off, info["loss"].tolist(), info["grad_norm"].tolist(), largest.tolist()
        )
        return StepOutput(loss, metrics)
    split = split_point(model, mem, cfg)
    hidden_t = split.early(model, anchor.xt)  # with grad: reused by the outer pass
    adaptation = adapt_on_trajectory(
        model,
        mem,
        batch.x0,
        batch.maskable,
        anchor.mask,
        cfg,
        mask_id=mask_id,
        generator=generator,
        per_sample=cfg.per_sample,
        anchor_hidden=hidden_t,
        loss_backend=loss_backend,
        allow_nonfinite=True,
        anchor_t=anchor.t,
    )
    loss, off = outer_losses(
        model, mem, adaptation.phi, hidden_t, split, batch, anchor, log_gap, loss_backend
    )
    metrics = step_metrics(
        loss, off, adaptation.losses, adaptation.grad_norms, adaptation.max_tensor_norms
    )
    return StepOutput(loss, metrics)


def compile_steps(compiler: Callable[[Callable], Callable] | None = None) -> dict[str, Callable]:
    """The compile-clean step functions wrapped by `compiler` (default `torch.compile`), for
    `standard_step(..., compiled=...)` and `memdlm_step(..., compiled=...)`.

    Compiled: the whole standard loss; for MemDLM the anchor's early layers, the inner states,
    the inner loop (bilevel.solve, through torch.func under the compiler), the outer loss and
    the gap diagnostic, with backward graphs for both losses. Left eager: the mask and phi_0
    draws (generators), the `.item()` metrics, backward calls and the optimizer.
    """
    compiler = torch.compile if compiler is None else compiler
    return {"standard": compiler(standard_loss), "memdlm": compiler(memdlm_core)}
