"""The standard masked-diffusion objective on an anchor x_t: draws, losses and the fused head.

Outer objective of both methods (memdlm-method.md section 2.1): t ~ U[eps, 1], M_t ~ Bernoulli(t)
over the response, weight 1/t, token normalisation by the maskable count. With the reference
Transformer the loss goes through `dd.masked_diffusion_loss_from_hidden` (only masked rows are
projected, docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import diffusion as dd
from recipes.memdlm.backbones import adapter
from recipes.memdlm.data.batches import Batch
from recipes.memdlm.method.split import Split, last_split

SCHEDULE = dd.LinearSchedule()  # alpha(t) = 1 - t, weight 1/t (LLaDA, MemDLM)


@dataclass
class Anchor:
    """The sampled noisy state x_t shared by the inner and the outer loop."""

    t: torch.Tensor  # (B,) float
    mask: torch.Tensor  # (B, L) bool, M_t
    xt: torch.Tensor  # (B, L) long


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
    if loss_backend is None:
        return None
    return adapter(model).head_weight(loss_backend)


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
    per_sample: bool = False,
) -> torch.Tensor:
    """The masked diffusion loss of the network after `split` and the head applied to `hidden`.

    head_grad=False: the fused loss treats the head's weight as a constant, so it skips the
    (V, D) weight-gradient products (the first-order inner loop differentiates phi only).
    per_sample: whether the fast weights bound around this call are per-sample (the caller
    knows: `InnerProblem.per_sample`, `cfg.per_sample`).
    When the network after the split acts on each position alone (`Split.position_wise`), it
    runs on the scored rows only (`tail_on_rows`): the same loss, at a fraction of the cost when
    few positions are masked.
    """
    head = fused_head(model, loss_backend)
    common = dict(schedule=SCHEDULE, maskable=maskable, normalize=normalize, weight=weight)
    if head is None:
        return dd.masked_diffusion_loss(split.logits(model, hidden), x0, mask, t, **common)
    row_map = tail_on_rows(model, split, mask, per_sample=per_sample)
    if row_map is None:
        hidden = split.features(model, hidden)
    return dd.masked_diffusion_loss_from_hidden(
        hidden, head if head_grad else head.detach(), x0, mask, t, backend=loss_backend,
        row_map=row_map, **common,
    )  # fmt: skip


def tail_on_rows(model, split: Split, mask: torch.Tensor, *, per_sample: bool = False):
    """The network after `split` as a map of the scored rows (N, D) -> (N, D), for
    `dd.masked_diffusion_loss_from_hidden(row_map=...)`; None when it needs every position.

    Shared fast weights (or none) see each row alone. Per-sample fast weights index rows by
    sample, so the rows go back into a (B, M, D) batch first, M the most rows any sample has,
    padded with zeros (whose outputs are dropped). Under `torch.compile` the loss scores every
    position (static shapes), and the per-sample case takes the full path there.
    mask: (B, L) bool, the positions the loss scores. per_sample: per-sample fast weights
    are bound around the call.
    """
    if not split.position_wise(model):
        return None
    if not per_sample:
        return lambda rows: split.row_features(model, rows)
    if torch.compiler.is_compiling():
        return None
    samples = mask.nonzero(as_tuple=True)[0]
    slots = (mask.long().cumsum(1) - 1)[mask]
    width = max(1, int(mask.sum(1).max()))

    def per_sample(rows: torch.Tensor) -> torch.Tensor:
        packed = rows.new_zeros(mask.shape[0], width, rows.shape[-1])
        packed = packed.index_put((samples, slots), rows)
        return split.features(model, packed)[samples, slots]

    return per_sample


def standard_loss(
    model, batch: Batch, anchor: Anchor, loss_backend: str | None = "auto", *, per_sample=False
):
    """The standard masked-diffusion loss on x_t (compile-clean); per_sample: per-sample fast
    weights are bound around the call (evaluation's adapted losses)."""
    if fused_head(model, loss_backend) is None:
        return outer_loss(model(anchor.xt), batch, anchor)
    split = last_split(model)  # so that the last FFN runs on the masked rows only
    return head_loss(
        model,
        split.early(model, anchor.xt),
        split,
        batch.x0,
        anchor.mask,
        anchor.t,
        batch.maskable,
        normalize="token",
        loss_backend=loss_backend,
        per_sample=per_sample,
    )
