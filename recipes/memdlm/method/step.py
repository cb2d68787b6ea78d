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
shared early computation too (`Split`), and when that layer is the last, what follows the split
acts on each position alone and runs on the scored rows only (`losses.head_loss`).
With the reference Transformer, the losses go through `dd.masked_diffusion_loss_from_hidden`
(`model.norm` output and `model.lm_head.weight`): only the masked rows are projected, and the
(B, L, V) logits are never formed (`loss_backend`, docs/kernels.md). `memdlm_core` and
`standard_loss` are the compile-clean parts of the steps (`compile_steps`): everything that draws
from a generator or reads values back to Python stays outside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch
from recipes.memdlm.method.inner import (
    InnerProblem,
    init_fast_weights,
    inner_states,
    objective_options,
    solve_inner,
)
from recipes.memdlm.method.losses import (
    SCHEDULE,
    Anchor,
    StepOutput,
    head_loss,
    sample_anchor,
    standard_loss,
)
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
class Draws:
    """Everything random in one training step, drawn before any model call (so that the rest
    is one deterministic, compile-clean function, and every rank of a torchrun job draws the
    global step and keeps its rows, `rows`).

    batch, anchor: the global batch and its x_t (both methods). MemDLM: the inner steps' input
    and loss masks, the look-ahead masks of the distillation objectives, phi_0, and the
    leak-free control's outer positions O (None unless `leak_free`). Standard with more than
    one anchor per batch (the compute-matched control): the extra anchors.
    """

    batch: Batch
    anchor: Anchor
    inputs: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    teachers: list[torch.Tensor | None] = field(default_factory=list)
    phi0: dict[str, torch.Tensor] | None = None
    outer: torch.Tensor | None = None
    extra_anchors: list[Anchor] = field(default_factory=list)

    def rows(self, rows: slice, *, per_sample: bool) -> Draws:
        """The rows that belong to one rank. A tensor that is one object stays one object (the
        MemDLM step recognises the anchor mask among the inner inputs by identity); a shared
        phi_0 (no batch dim) is every rank's."""
        cut: dict[int, torch.Tensor] = {}

        def of(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in cut:
                cut[id(tensor)] = tensor[rows]
            return cut[id(tensor)]

        def anchor_of(a: Anchor) -> Anchor:
            return Anchor(of(a.t), of(a.mask), of(a.xt))

        b, phi0 = self.batch, self.phi0
        if phi0 is not None and per_sample:
            phi0 = {k: of(v) for k, v in phi0.items()}
        return Draws(
            Batch(of(b.x0), of(b.maskable), of(b.prompt_lengths)),
            anchor_of(self.anchor),
            [of(m) for m in self.inputs],
            [of(m) for m in self.targets],
            [None if m is None else of(m) for m in self.teachers],
            phi0,
            None if self.outer is None else of(self.outer),
            [anchor_of(a) for a in self.extra_anchors],
        )


def draw(
    model,
    mem,
    batch: Batch,
    anchor: Anchor,
    cfg: MemDLMConfig,
    generator,
    *,
    mask_id: int,
    time_eps: float = 1e-3,
    anchors: int = 1,
) -> Draws:
    """The step's draws after its batch and anchor, from `generator` (the inner stream).

    MemDLM (mem given): trajectory masks, then phi_0, then (leak_free) the outer positions, in
    that order. Standard: `anchors - 1` extra anchors (the stream is otherwise unused by it).
    """
    if mem is None:
        extra = [
            sample_anchor(batch, mask_id=mask_id, eps=time_eps, generator=generator)
            for _ in range(anchors - 1)
        ]
        return Draws(batch, anchor, extra_anchors=extra)
    inputs = trajectory_masks(anchor.mask, batch.maskable, cfg, generator)
    teachers = teacher_masks(inputs, anchor.mask, cfg)
    targets = loss_masks(inputs, anchor.mask, cfg.inner_loss_mask, teachers)
    phi0 = init_fast_weights(model, mem, batch.x0, per_sample=cfg.per_sample, generator=generator)
    outer = None
    if cfg.leak_free:
        outer = outer_positions(anchor.mask, cfg.leak_free_fraction, generator)
        inputs, targets, teachers = without_outer(inputs, targets, teachers, outer)
    return Draws(batch, anchor, inputs, targets, teachers, phi0, outer)


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

    def loss_of(hidden, per_sample=False):
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
            per_sample=per_sample,
        )

    with mem.bind(phi):
        loss = loss_of(hidden_t, per_sample=cfg is not None and cfg.per_sample)
    off = None
    if log_gap:
        with torch.no_grad():
            off = loss_of(hidden_t.detach())
    return loss, off


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
    outer: the leak-free control's outer positions (`Draws.outer`).
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


def step_loss(
    model,
    mem,
    draws: Draws,
    cfg: MemDLMConfig,
    *,
    mask_id: int,
    log_gap: bool,
    loss_backend: str | None = "auto",
    compiled: dict[str, Callable] | None = None,
    grad_sync=None,
    share: float = 1.0,
):
    """The step's loss from its draws, for both methods: (loss times `share`, parts).

    Standard (mem None): the masked-diffusion loss on x_t, averaged over the anchors. MemDLM:
    `memdlm_core` (the inner loop on phi, then the outer loss with phi bound); parts holds the
    inner loop's info and, with log_gap, the fast-weights-off loss. share: this rank's fraction
    of the global batch's maskable tokens (1 in one process), so that the ranks' losses add up
    to the one-process loss. compiled: from `compile_steps` (None = eager). grad_sync: see
    `inner_optimizer`.
    """
    if mem is None:
        loss_fn = compiled["standard"] if compiled is not None else standard_loss
        anchors = [draws.anchor, *draws.extra_anchors]
        loss = sum(loss_fn(model, draws.batch, a, loss_backend) for a in anchors[1:])
        loss = loss_fn(model, draws.batch, anchors[0], loss_backend) + loss
        return loss * (share / len(anchors)), {}
    core = compiled["memdlm"] if compiled is not None else memdlm_core
    loss, off, info = core(
        model,
        mem,
        draws.batch,
        draws.anchor,
        draws.inputs,
        draws.targets,
        draws.phi0,
        cfg,
        mask_id,
        log_gap,
        loss_backend,
        grad_sync=grad_sync,
        teachers=draws.teachers,
        outer=draws.outer,
    )
    parts = {"info": info}
    if off is not None:
        parts["loss_off"] = off * share
    return loss * share, parts


def step_record(loss: float, off: float | None, losses, norms, largest) -> dict[str, Any]:
    """The logged record of a step from plain numbers (one process, or reduced over ranks):
    loss, the inner losses, gradient norms and largest per-tensor norms per inner step, and the
    fast-weights-off loss and the gap when measured. A non-finite inner loss means phi is not
    finite: the step is skipped, so its loss (and gap) are NaN and `inner_nonfinite` is set."""
    record: dict[str, Any] = {"loss": loss}
    for k, (value, norm, big) in enumerate(zip(losses, norms, largest), 1):
        record[f"inner_loss_{k}"] = value
        record[f"inner_grad_norm_{k}"] = norm
        if math.isfinite(big):
            record[f"inner_max_tensor_norm_{k}"] = big
    if not all(math.isfinite(value) for value in losses):
        record["inner_nonfinite"] = True
        record["loss"] = math.nan
    if off is not None:
        record["loss_off"] = off
        record["gap"] = off - record["loss"]
    return record


def standard_step(
    model,
    batch: Batch,
    anchor: Anchor,
    *,
    loss_backend: str | None = "auto",
    compiled: dict[str, Callable] | None = None,
) -> StepOutput:
    """One standard step in one process (without the optimizer update): `step_loss`."""
    loss, _ = step_loss(  # Standard reads neither the MemDLM config nor the mask id
        model,
        None,
        Draws(batch, anchor),
        MemDLMConfig(),
        mask_id=-1,
        log_gap=False,
        loss_backend=loss_backend,
        compiled=compiled,
    )
    return StepOutput(loss, step_record(loss.item(), None, [], [], []))


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
    """One MemDLM step in one process (without the optimizer update): `draw` from `generator`,
    then `step_loss` (see the module docstring); compiled: from `compile_steps`."""
    draws = draw(model, mem, batch, anchor, cfg, generator, mask_id=mask_id)
    loss, parts = step_loss(
        model,
        mem,
        draws,
        cfg,
        mask_id=mask_id,
        log_gap=log_gap,
        loss_backend=loss_backend,
        compiled=compiled,
    )
    info = parts["info"]
    largest = torch.stack(list(info["grad_norms"].values())).amax(0)
    off = parts["loss_off"].item() if "loss_off" in parts else None
    record = step_record(
        loss.item(), off, info["loss"].tolist(), info["grad_norm"].tolist(), largest.tolist()
    )
    return StepOutput(loss, record)


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
