"""The two training methods as objects: `Standard` and `MemDLM`, each with
`draw(batch, generators) -> Draws` and `loss(backbone, draws) -> (loss, Parts)`.

MemDLM (arXiv 2603.22241; memdlm-method.md section 2.4) for one batch:

1. Sample the anchor: t ~ U[eps, 1] per row, M_t ~ Bernoulli(t) over the response, x_t.
2. Reset fast weights phi (LoRA on the FFN of the last layers; A random, B = 0).
3. Simulate a short denoising trajectory ending at the anchor ("pmc", K=2): a noisier
   pre-anchor state whose mask is a superset of M_t with ratio ~ s_pre * r, then x_t itself.
   Take one SGD step on phi per state (per-tensor gradient clipping), first-order.
4. Outer loss: the ordinary masked-diffusion loss on the same x_t with phi bound as constants;
   its gradient trains the base model theta only.

Steps 1-2 and the trajectory's masks are `draw`; step 3 is the inner half (`MemDLM.inner`, also
evaluation's and prompt adaptation's inner loop); step 4 the outer half (`outer_losses`).

Efficiency: layers before the first fast-weight layer do not depend on phi, so they run once per
state without gradient, and the anchor's early hidden states are shared with the outer pass. With
fast weights only on the FFN of that layer (the default), its attention sub-block is part of the
shared early computation too (`Split`), and when that layer is the last, what follows the split
acts on each position alone and runs on the scored rows only (`losses.head_loss`).
With the reference Transformer, the losses go through `dd.masked_diffusion_loss_from_hidden`
(`model.norm` output and `model.lm_head.weight`): only the masked rows are projected, and the
(B, L, V) logits are never formed (`loss_backend`, docs/kernels.md). `memdlm_core` and
`standard_loss` are the compile-clean parts (`compiled(...)`): everything that draws from a
generator or reads values back to Python stays outside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

import diffusion as dd
from recipes.memdlm.backbones import Backbone, resolve
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch
from recipes.memdlm.method.inner import (
    InnerProblem,
    adapt,
    fast_weight_dtype,
    inner_optimizer,
    make_fast_weights,
    objective_options,
)
from recipes.memdlm.method.losses import SharedRows, head_loss, standard_loss
from recipes.memdlm.method.split import Split, split_point
from recipes.memdlm.method.trajectory import (
    SCHEDULE,
    Anchor,
    Draws,
    Generators,
    draw_memdlm,
    inner_draws,
    sample_anchor,
)


@dataclass
class Parts:
    """What a step's loss reports besides the loss: the inner loop's info (solve's tensors:
    inner losses, gradient norms), the fast-weights-off loss (times the rank's share) when
    measured, and the adapted phi (MemDLM; None for Standard)."""

    info: dict[str, Any] | None = None
    loss_off: torch.Tensor | None = None
    phi: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Standard:
    """The standard masked-diffusion objective. anchors > 1: independent anchors per batch, the
    loss averaged over them (the compute-matched control); the extras come from the inner
    stream. compiled: `standard_loss` through a compiler (`compiled(...)`), None = eager."""

    mask_id: int
    time_eps: float = 1e-3
    loss_backend: str | None = "auto"
    anchors: int = 1
    compiled_loss: Callable | None = None

    per_sample = False  # no fast weights: nothing per sample

    def compiled(self, compiler: Callable[[Callable], Callable] | None = None) -> Standard:
        return replace(self, compiled_loss=(compiler or torch.compile)(standard_loss))

    def placed(self, backbone: Backbone) -> Standard:
        """Nothing depends on how the model is wrapped."""
        del backbone
        return self

    def gap_steps(self, steps: int) -> range:
        """The steps of a phase of `steps` that log the fast-weights-off gap: none."""
        del steps
        return range(0)

    def draw(self, batch: Batch, generators: Generators) -> Draws:
        anchor = sample_anchor(
            batch, mask_id=self.mask_id, eps=self.time_eps, generator=generators.anchor
        )
        extra = [
            sample_anchor(
                batch, mask_id=self.mask_id, eps=self.time_eps, generator=generators.inner
            )
            for _ in range(self.anchors - 1)
        ]
        return Draws(batch, anchor, extra_anchors=extra)

    def loss(self, backbone: Backbone, draws: Draws, *, log_gap=False, share=1.0, grad_sync=None):
        """(loss times `share`, Parts()): the masked-diffusion loss on x_t, averaged over the
        anchors. share: this rank's fraction of the global batch's maskable tokens (1 in one
        process), so that the ranks' losses add up to the one-process loss."""
        del log_gap, grad_sync
        loss_fn = self.compiled_loss or standard_loss
        anchors = [draws.anchor, *draws.extra_anchors]
        loss = sum(loss_fn(backbone, draws.batch, a, self.loss_backend) for a in anchors[1:])
        loss = loss_fn(backbone, draws.batch, anchors[0], self.loss_backend) + loss
        return loss * (share / len(anchors)), Parts()

    def close(self) -> None:
        """Nothing attached to the model."""


@dataclass(frozen=True)
class MemDLM:
    """The MemDLM step (module docstring) with fast weights `mem` on the run's backbone.

    Built once per phase by `MemDLM.on(backbone, cfg, ...)`, which attaches the fast weights
    (`close()` takes them off) and finds the split (`layer`, `mid`) and the inner objective.
    uniform: weight the inner tokens by 1 instead of 1/t (prompt adaptation, `for_prompts`).
    """

    cfg: MemDLMConfig
    mem: Any
    mask_id: int
    layer: int
    mid: bool
    objective: dict[str, Any]
    phi_dtype: torch.dtype
    optimizer: Any  # the inner optimizer (`inner_optimizer`), built once
    time_eps: float = 1e-3
    loss_backend: str | None = "auto"
    uniform: bool = False
    compiled_core: Callable | None = None
    shares_ffn: bool = False  # the split's `shares_ffn`, found with it (`on`, `placed`)

    @classmethod
    def on(cls, backbone: Backbone, cfg: MemDLMConfig, *, mask_id: int, mem=None, **options):
        """The method for `backbone`; mem: fast weights already attached (else made here)."""
        mem = make_fast_weights(backbone, cfg) if mem is None else mem
        split = split_point(backbone, mem.targets, cfg)
        objective, dtype = objective_options(backbone, cfg), fast_weight_dtype(backbone)
        optimizer = inner_optimizer(cfg, cfg.per_sample)
        fields = (cfg, mem, mask_id, split.layer, split.mid, objective, dtype, optimizer)
        return cls(*fields, shares_ffn=split.shares_ffn(), **options)

    def placed(self, backbone: Backbone) -> MemDLM:
        """The method once the model is wrapped for training (FSDP2 shards in place): a sharded
        layer must be entered whole, so the split is found again (`split_point`)."""
        split = split_point(backbone, self.mem.targets, self.cfg)
        return replace(self, layer=split.layer, mid=split.mid, shares_ffn=split.shares_ffn())

    @property
    def per_sample(self) -> bool:
        return self.cfg.per_sample

    def compiled(self, compiler: Callable[[Callable], Callable] | None = None) -> MemDLM:
        return replace(self, compiled_core=(compiler or torch.compile)(memdlm_core))

    def for_prompts(self) -> MemDLM:
        """Inference-time adaptation (memdlm-method.md 3.2): one phi per prompt, uniform
        weights, no leak-free control (there is no outer target to hide)."""
        cfg = self.cfg.model_copy(update={"per_sample": True, "leak_free": False})
        return replace(self, cfg=cfg, uniform=True, optimizer=inner_optimizer(cfg, True))

    def gap_steps(self, steps: int) -> range:
        """The steps of a phase of `steps` that log the fast-weights-off gap: every
        `gap_every`-th from step 0 (chosen once per phase, so the loop asks no one per step)."""
        return range(0, steps, self.cfg.gap_every)

    def split(self, backbone: Backbone) -> Split:
        return Split(backbone, self.layer, self.mid)

    def draw(self, batch: Batch, generators: Generators) -> Draws:
        """The anchor from the anchor stream, then the rest from the inner stream
        (`trajectory.draw_memdlm`)."""
        init_phi = self._phi0_of(batch)
        eps = self.time_eps
        return draw_memdlm(batch, generators, self.cfg, init_phi, mask_id=self.mask_id, eps=eps)

    def draw_after(self, batch: Batch, anchor: Anchor, generator) -> Draws:
        """The draws after a given anchor (`trajectory.inner_draws`), from `generator`: the
        same draws as `draw`'s after its anchor (evaluation's fixed anchors, prompts)."""
        return inner_draws(batch, anchor, self.cfg, generator, self._phi0_of(batch))

    def _phi0_of(self, batch: Batch):
        """phi_0's draw (`init_phi(generator=...)`): A random, B = 0; one per row when
        per_sample; float32 at least (accurate updates under bf16), float64 for float64."""
        rows = batch.x0.shape[0] if self.per_sample else None
        device, dtype = batch.x0.device, self.phi_dtype
        return partial(self.mem.init, batch_size=rows, device=device, dtype=dtype)

    def problem(self, backbone: Backbone, batch: Batch) -> InnerProblem:
        return InnerProblem(
            self.split(backbone), self.mem, batch.x0, batch.maskable, self.per_sample,
            self.loss_backend, self.uniform, **self.objective,
        )  # fmt: skip

    def inner(
        self, backbone, draws: Draws, *, anchor_hidden=None, shared=None, grad_sync=None,
        allow_nonfinite=False,
    ):  # fmt: skip
        """The inner half: (detached adapted phi, inner info) from the step's draws. grad_sync:
        the all-reduce of shared fast-weight gradients across ranks (`inner_optimizer`);
        anchor_hidden, shared: the outer pass's (`inner.inner_states`)."""
        optimizer = self.optimizer
        if grad_sync is not None:
            optimizer = inner_optimizer(self.cfg, self.per_sample, grad_sync)
        return adapt(
            self.problem(backbone, draws.batch), draws, optimizer, mask_id=self.mask_id,
            anchor_hidden=anchor_hidden, shared=shared, allow_nonfinite=allow_nonfinite,
        )  # fmt: skip

    def shares_anchor_rows(self, draws: Draws) -> bool:
        """Whether the inner step on the anchor, the outer loss and the diagnostic can share
        the tail's start on the anchor's scored rows (`losses.SharedRows`): the backbone can
        share it after the split (`shares_ffn`) and the inner step scores the outer loss's
        positions, with one phi for the batch and the cross-entropy, in eager mode."""
        plain = self.objective["inner_loss"] == "ce" and not self.per_sample
        shareable = self.shares_ffn and draws.anchor_scores_outer and plain
        return shareable and not torch.compiler.is_compiling()

    def loss(self, backbone: Backbone, draws: Draws, *, log_gap=False, share=1.0, grad_sync=None):
        """(loss times `share`, Parts): the inner half, then the outer loss with phi bound;
        with log_gap, the fast-weights-off loss too. share: see `Standard.loss`."""
        core = self.compiled_core or memdlm_core
        loss, off, phi, info = core(self, backbone, draws, log_gap, grad_sync)
        return loss * share, Parts(info, None if off is None else off * share, phi)

    def close(self) -> None:
        """Take the fast weights off the model."""
        self.mem.remove()


def memdlm_core(method: MemDLM, backbone: Backbone, draws: Draws, log_gap: bool, grad_sync=None):
    """The MemDLM step from its draws (compile-clean: no generator, no `.item()`).

    Returns (loss, loss with fast weights off or None, adapted phi, inner info dict)."""
    split = method.split(backbone)
    hidden_t = split.early(draws.anchor.xt)  # with grad: reused by the outer pass
    shared = SharedRows() if method.shares_anchor_rows(draws) else None
    phi, info = method.inner(
        backbone, draws, anchor_hidden=hidden_t, shared=shared, grad_sync=grad_sync,
        allow_nonfinite=True,
    )  # fmt: skip
    loss, off = outer_losses(method, split, phi, hidden_t, draws, log_gap, shared)
    return loss, off, phi, info


def outer_losses(
    method: MemDLM, split: Split, phi, hidden_t, draws: Draws, log_gap: bool, shared=None
):
    """The outer loss with phi bound, and (log_gap) the same loss with fast weights off.

    draws.outer: the leak-free control's positions O (None: all of M_t); the loss then scores
    O only, with weight 1 / (t q), q = cfg.leak_free_fraction, so that its expectation over O
    is the standard loss. shared: the anchor's scored rows shared with the inner step on the
    anchor (`losses.SharedRows`), or None.
    """
    batch, anchor = draws.batch, draws.anchor
    mask, weight = anchor.mask, None
    if draws.outer is not None:
        mask = draws.outer
        weight = SCHEDULE.weight(anchor.t) / method.cfg.leak_free_fraction

    def loss_of(hidden, per_sample):
        return head_loss(
            split, hidden, batch.x0, mask, anchor.t, batch.maskable, normalize="token",
            weight=weight, loss_backend=method.loss_backend, per_sample=per_sample,
            shared=None if per_sample else shared,
        )  # fmt: skip

    with method.mem.bind(phi):
        loss = loss_of(hidden_t, method.per_sample)
    off = None
    if log_gap:
        with torch.no_grad():
            off = loss_of(hidden_t.detach(), False)
    return loss, off


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

    model: a model or its `Backbone`; mem: fast weights attached to it. Every prompt token is
    maskable. Anchor: Bernoulli(prompt_anchor_ratio); then the training step's draws after an
    anchor (`MemDLM.draw_after`: the configured strategy's trajectory, phi_0) and its inner half
    (`MemDLM.inner`), with uniform weighting and the mean over masked tokens, one phi per prompt
    (`MemDLM.for_prompts`), exactly as if each prompt were adapted alone. Returns detached
    per-sample fast weights.
    """
    backbone = resolve(model)
    method = MemDLM.on(backbone, cfg, mask_id=mask_id, mem=mem, loss_backend=loss_backend)
    method = method.for_prompts()
    maskable = torch.ones_like(prompt, dtype=torch.bool)
    t = torch.full((prompt.shape[0],), cfg.prompt_anchor_ratio, device=prompt.device)
    xt, mask = dd.corrupt(
        prompt, t, mask_id=mask_id, schedule=SCHEDULE, maskable=maskable, generator=generator
    )
    batch = Batch(prompt, maskable, torch.zeros_like(prompt[:, 0]))
    draws = method.draw_after(batch, Anchor(t, mask, xt), generator)
    phi, _ = method.inner(backbone, draws)
    return phi


def step_record(loss: float, off: float | None, losses, norms, largest) -> dict[str, Any]:
    """The logged record of a step from plain numbers (one process, or reduced over ranks):
    loss, the inner losses, gradient norms and largest per-tensor norms per inner step, the
    last inner step's gradient norm (`inner_grad_norm_final`), and the fast-weights-off loss
    and the gap when measured. A non-finite inner loss means phi is not finite: the step is
    skipped, so its loss (and gap) are NaN and `inner_nonfinite` is set."""
    record: dict[str, Any] = {"loss": loss}
    for k, (value, norm, big) in enumerate(zip(losses, norms, largest), 1):
        record[f"inner_loss_{k}"] = value
        record[f"inner_grad_norm_{k}"] = norm
        if math.isfinite(big):
            record[f"inner_max_tensor_norm_{k}"] = big
    if norms:
        record["inner_grad_norm_final"] = norms[-1]
    if not all(math.isfinite(value) for value in losses):
        record["inner_nonfinite"] = True
        record["loss"] = math.nan
    if off is not None:
        record["loss_off"] = off
        record["gap"] = off - record["loss"]
    return record


def record_of(loss: torch.Tensor, parts: Parts) -> dict[str, Any]:
    """`step_record` of a step in one process, read back from the device in one `.tolist()`."""
    values = [loss.detach().double().reshape(1)]
    if parts.loss_off is not None:
        values.append(parts.loss_off.detach().double().reshape(1))
    steps = 0
    if parts.info is not None:
        info = parts.info
        steps = info.loss.numel()
        largest = torch.stack(list(info.grad_norms.values())).amax(0)
        values += [t.detach().double().reshape(-1) for t in (info.loss, info.grad_norm, largest)]
    flat = torch.cat(values).tolist()
    off = flat[1] if parts.loss_off is not None else None
    inner = flat[len(flat) - 3 * steps :] if steps else []
    return step_record(flat[0], off, inner[:steps], inner[steps : 2 * steps], inner[2 * steps :])
