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
from dataclasses import dataclass, field
from typing import Any

import torch

import bilevel as bl
import diffusion as dd
import memory as mm
from recipes.memdlm.batches import Batch
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.trajectory import loss_masks, realised_ratio, trajectory_masks

SCHEDULE = dd.LinearSchedule()  # alpha(t) = 1 - t, weight 1/t (LLaDA, MemDLM)


@dataclass
class Anchor:
    """The sampled noisy state x_t shared by the inner and the outer loop."""

    t: torch.Tensor  # (B,) float
    mask: torch.Tensor  # (B, L) bool, M_t
    xt: torch.Tensor  # (B, L) long


@dataclass
class InnerState:
    """One state of the simulated trajectory: the input, the loss mask and the weight time."""

    hidden: torch.Tensor  # (B, L, D) early-layer output for this state's input, detached
    loss_mask: torch.Tensor  # (B, L) bool
    ratio: torch.Tensor  # (B,) realised mask ratio of the input, the inner loss's t


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the base model
    metrics: dict[str, float] = field(default_factory=dict)


def sample_anchor(batch: Batch, *, mask_id: int, eps: float, generator) -> Anchor:
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


def outer_loss(logits: torch.Tensor, batch: Batch, anchor: Anchor) -> torch.Tensor:
    """weight(t) * CE on M_t, divided by the number of maskable tokens (LLaDA SFT)."""
    return dd.masked_diffusion_loss(
        logits,
        batch.x0,
        anchor.mask,
        anchor.t,
        schedule=SCHEDULE,
        maskable=batch.maskable,
        normalize="token",
    )


def fused_head(model, loss_backend: str | None) -> torch.Tensor | None:
    """`model.lm_head.weight` when the fused loss applies, else None (the logits path).

    It applies to the reference `dd.Transformer` whose bias-free `lm_head` carries no hooks
    (a hook, e.g. fast weights on the head, must see the head's call), unless loss_backend is
    None. loss_backend: None, "auto", "reference" or "triton" (`diffusion.kernels`).
    """
    if loss_backend is None or not isinstance(model, dd.Transformer):
        return None
    head = model.lm_head
    if head.bias is not None or head._forward_hooks or head._forward_pre_hooks:
        return None
    return head.weight


def head_loss(
    model,
    hidden: torch.Tensor,
    split: Split,
    x0: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,
    maskable: torch.Tensor,
    *,
    normalize: str,
    weight: torch.Tensor | None = None,
    loss_backend: str | None = "auto",
    head_grad: bool = True,
) -> torch.Tensor:
    """The masked diffusion loss of the network after `split` and the head applied to `hidden`.

    head_grad=False: the fused loss treats the head's weight as a constant, so it skips the
    (V, D) weight-gradient products (the first-order inner loop differentiates phi only).
    """
    head = fused_head(model, loss_backend)
    common = dict(schedule=SCHEDULE, maskable=maskable, normalize=normalize, weight=weight)
    if head is None:
        return dd.masked_diffusion_loss(split.logits(model, hidden), x0, mask, t, **common)
    features = split.features(model, hidden)
    return dd.masked_diffusion_loss_from_hidden(
        features, head if head_grad else head.detach(), x0, mask, t, backend=loss_backend, **common
    )


def standard_loss(model, batch: Batch, anchor: Anchor, loss_backend: str | None = "auto"):
    """The standard masked-diffusion loss on x_t (compile-clean)."""
    if fused_head(model, loss_backend) is None:
        return outer_loss(model(anchor.xt), batch, anchor)
    hidden = model.hidden_states(anchor.xt, upto=0)
    return head_loss(
        model,
        hidden,
        Split(0),
        batch.x0,
        anchor.mask,
        anchor.t,
        batch.maskable,
        normalize="token",
        loss_backend=loss_backend,
    )


def standard_step(
    model,
    batch: Batch,
    anchor: Anchor,
    *,
    loss_backend: str | None = "auto",
    compiled: dict[str, Callable] | None = None,
) -> StepOutput:
    """compiled: from `compile_steps` (None = eager)."""
    loss_fn = compiled["standard"] if compiled is not None else standard_loss
    loss = loss_fn(model, batch, anchor, loss_backend)
    return StepOutput(loss, {"loss": loss.item()})


# --------------------------------------------------------------------------- inner loop


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
    if hasattr(model, "fast_weight_targets"):  # a wrapped backbone (hf.HFDenoiser) knows its FFNs
        targets = model.fast_weight_targets(cfg.layer_fraction, tuple(cfg.targets))
    else:
        targets = mm.last_layers(model, fraction=cfg.layer_fraction, modules=tuple(cfg.targets))
    if cfg.fast_weights == "full":
        return mm.FullFastWeights(model, targets)
    return mm.FastLoRA(model, targets, rank=cfg.rank, alpha=cfg.alpha)


def first_fast_layer(model, cfg: MemDLMConfig) -> int:
    """Index of the first layer holding fast weights (the reference code's rule)."""
    return int(len(model.layers) * (1 - cfg.layer_fraction))


@dataclass(frozen=True)
class Split:
    """Where the part of the network that depends on the fast weights begins.

    Before `layers[layer]`, or, with `mid`, between that layer's attention and its feed-forward:
    when the fast weights of the first fast layer sit only in its FFN (the default targets), the
    layer's attention does not depend on them and is computed once per input.
    """

    layer: int
    mid: bool = False

    def early(self, model, x: torch.Tensor) -> torch.Tensor:
        """Everything before the split: (B, L) tokens -> (B, L, D)."""
        return model.hidden_states(x, upto=self.layer, **self._kwargs())

    def features(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return model.features_from(hidden, start=self.layer, **self._kwargs())

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return model.logits_from(hidden, start=self.layer, **self._kwargs())

    def _kwargs(self) -> dict[str, bool]:
        return {"mid_layer": True} if self.mid else {}


def split_point(model, mem, cfg: MemDLMConfig) -> Split:
    """The split for `mem`'s targets: mid-layer for the reference Transformer when every target
    of the first fast layer is one of its FFN projections (`layers.k.mlp.*`)."""
    layer = first_fast_layer(model, cfg)
    prefix = f"layers.{layer}."
    ffn_only = all(
        not name.startswith(prefix) or name.startswith(prefix + "mlp.") for name in mem.targets
    )
    mid = (
        isinstance(model, dd.Transformer)
        and layer < len(model.layers)
        and ffn_only
        and not _wrapped(model.layers[layer])
    )
    return Split(layer, mid)


def _wrapped(module: torch.nn.Module) -> bool:
    """True when the layer must be entered through its own call: FSDP2 gathers a sharded layer's
    parameters in its forward hooks, which running its sub-blocks directly would bypass."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or bool(
        module._forward_pre_hooks or module._forward_hooks
    )


def make_inner_loss(
    model,
    mem,
    x0,
    maskable,
    split: Split,
    *,
    per_sample: bool,
    uniform: bool,
    loss_backend: str | None = "auto",
):
    """inner_loss(phi, meta, state) for bilevel.solve: the model after `split` with phi bound.

    Weighting: 1/r with r the state's realised mask ratio (training), or uniform (inference).
    Normalisation: mean over the state's loss-masked tokens, per row when per_sample (so each
    sample's fast weights see exactly the loss they would see alone). For the first-order inner
    loop only: the fused loss gets no gradient path to the output head's weight.
    """

    def inner_loss(phi, meta, state: InnerState) -> torch.Tensor:
        del meta  # the outer variables are the model's own parameters, closed over
        weight = torch.ones_like(state.ratio) if uniform else SCHEDULE.weight(state.ratio)
        if per_sample:  # sum_b (w_b / |M_b|) sum_{i in M_b} CE_bi
            weight = weight / state.loss_mask.sum(1).clamp(min=1)
        with mem.bind(phi):
            return head_loss(
                model,
                state.hidden,
                split,
                x0,
                state.loss_mask,
                state.ratio,
                maskable,
                normalize="sum" if per_sample else "masked",
                weight=weight,
                loss_backend=loss_backend,
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
    model,
    x0: torch.Tensor,
    maskable: torch.Tensor,
    input_masks: list[torch.Tensor],
    loss_masks_: list[torch.Tensor],
    split: Split,
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
                hidden = split.early(model, torch.where(input_mask, mask_id, x0))
        # A row with nothing masked has no loss terms; the floor only keeps t inside (0, 1].
        ratio = realised_ratio(input_mask, maskable).clamp(min=1e-6)
        states.append(InnerState(hidden, loss_mask, ratio))
    return states


def init_fast_weights(model, mem, x0: torch.Tensor, *, per_sample: bool, generator):
    """phi_0: A random (drawn from `generator`), B = 0; one per sample when per_sample."""
    batch_size = x0.shape[0] if per_sample else None
    # float32 fast weights under bf16 models (accurate updates), float64 for float64 models.
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    return mem.init(batch_size=batch_size, generator=generator, device=x0.device, dtype=dtype)


def solve_inner(
    model,
    mem,
    x0: torch.Tensor,
    maskable: torch.Tensor,
    states: list[InnerState],
    phi0: dict[str, torch.Tensor],
    cfg: MemDLMConfig,
    *,
    split: Split,
    per_sample: bool,
    uniform: bool = False,
    loss_backend: str | None = "auto",
    grad_sync=None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The inner loop through `bilevel.solve` in first-order mode (compile-clean).

    Returns the detached adapted fast weights and solve's info dict (tensors). grad_sync: see
    `inner_optimizer`.
    """
    inner_loss = make_inner_loss(
        model,
        mem,
        x0,
        maskable,
        split,
        per_sample=per_sample,
        uniform=uniform,
        loss_backend=loss_backend,
    )
    with torch.enable_grad():  # the inner loop needs gradients even inside evaluation code
        phi, info = bl.solve(
            inner_loss,
            phi0,
            None,
            optimizer=inner_optimizer(cfg, per_sample, grad_sync),
            steps=len(states),
            mode=bl.FirstOrder(),
            data=bl.PerStep(states),
            return_info=True,
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
) -> Adaptation:
    """Run the inner loop through `bilevel.solve` in first-order mode.

    precomputed: {state index: early hidden states} already computed by the caller (the anchor's,
    shared with the outer pass); other states run the early layers here without gradient.
    """
    split = split_point(model, mem, cfg)
    states = inner_states(
        model,
        x0,
        maskable,
        input_masks,
        loss_masks_,
        split,
        mask_id=mask_id,
        precomputed=precomputed,
    )
    phi0 = init_fast_weights(model, mem, x0, per_sample=per_sample, generator=generator)
    phi, info = solve_inner(
        model,
        mem,
        x0,
        maskable,
        states,
        phi0,
        cfg,
        split=split,
        per_sample=per_sample,
        uniform=uniform,
        loss_backend=loss_backend,
    )
    largest = torch.stack(list(info["grad_norms"].values())).amax(0)
    return Adaptation(phi, info["loss"].tolist(), info["grad_norm"].tolist(), largest.tolist())


def _outer(model, mem, phi, hidden_t, split, batch, anchor, log_gap, loss_backend):
    """The outer loss with phi bound, and (log_gap) the same loss with fast weights off."""

    def loss_of(hidden):
        return head_loss(
            model,
            hidden,
            split,
            batch.x0,
            anchor.mask,
            anchor.t,
            batch.maskable,
            normalize="token",
            loss_backend=loss_backend,
        )

    with mem.bind(phi):
        loss = loss_of(hidden_t)
    off = None
    if log_gap:
        with torch.no_grad():
            off = loss_of(hidden_t.detach())
    return loss, off


def _step_metrics(loss, off, losses, grad_norms, max_tensor_norms) -> dict[str, float]:
    metrics = {"loss": loss.item()}
    for k, (value, norm, largest) in enumerate(zip(losses, grad_norms, max_tensor_norms), 1):
        metrics[f"inner_loss_{k}"] = value
        metrics[f"inner_grad_norm_{k}"] = norm
        metrics[f"inner_max_tensor_norm_{k}"] = largest
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
):
    """The MemDLM step from drawn masks and phi_0 (compile-clean: no generator, no `.item()`).

    Returns (loss, loss with fast weights off or None, inner info dict of tensors). grad_sync:
    see `inner_optimizer` (data-parallel training with shared fast weights).
    """
    split = split_point(model, mem, cfg)
    hidden_t = split.early(model, anchor.xt)  # with grad: reused by the outer pass
    anchor_index = {len(input_masks) - 1: hidden_t} if input_masks[-1] is anchor.mask else {}
    states = inner_states(
        model,
        batch.x0,
        batch.maskable,
        input_masks,
        loss_masks_,
        split,
        mask_id=mask_id,
        precomputed=anchor_index,
    )
    phi, info = solve_inner(
        model,
        mem,
        batch.x0,
        batch.maskable,
        states,
        phi0,
        cfg,
        split=split,
        per_sample=cfg.per_sample,
        loss_backend=loss_backend,
        grad_sync=grad_sync,
    )
    loss, off = _outer(model, mem, phi, hidden_t, split, batch, anchor, log_gap, loss_backend)
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
    inputs = trajectory_masks(anchor.mask, batch.maskable, cfg, generator)
    targets = loss_masks(inputs, anchor.mask, cfg.inner_loss_mask)
    if compiled is not None:
        phi0 = init_fast_weights(
            model, mem, batch.x0, per_sample=cfg.per_sample, generator=generator
        )
        loss, off, info = compiled["memdlm"](
            model, mem, batch, anchor, inputs, targets, phi0, cfg, mask_id, log_gap, loss_backend
        )
        largest = torch.stack(list(info["grad_norms"].values())).amax(0)
        metrics = _step_metrics(
            loss, off, info["loss"].tolist(), info["grad_norm"].tolist(), largest.tolist()
        )
        return StepOutput(loss, metrics)
    split = split_point(model, mem, cfg)
    hidden_t = split.early(model, anchor.xt)  # with grad: reused by the outer pass
    anchor_index = {len(inputs) - 1: hidden_t} if inputs[-1] is anchor.mask else {}
    adaptation = adapt(
        model,
        mem,
        batch.x0,
        batch.maskable,
        inputs,
        targets,
        cfg,
        mask_id=mask_id,
        generator=generator,
        per_sample=cfg.per_sample,
        precomputed=anchor_index,
        loss_backend=loss_backend,
    )
    loss, off = _outer(
        model, mem, adaptation.phi, hidden_t, split, batch, anchor, log_gap, loss_backend
    )
    metrics = _step_metrics(
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
    inputs = trajectory_masks(anchor_mask, maskable, cfg, generator)
    targets = loss_masks(inputs, anchor_mask, cfg.inner_loss_mask)
    adaptation = adapt(
        model,
        mem,
        prompt,
        maskable,
        inputs,
        targets,
        cfg,
        mask_id=mask_id,
        generator=generator,
        per_sample=True,
        uniform=True,
        loss_backend=loss_backend,
    )
    return adaptation.phi


def cosine_with_warmup(total: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s (0-based): linear warm-up, cosine decay."""
    warmup = max(1, round(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
