"""The standard masked-diffusion objective on an anchor x_t: losses and the fused head.

Outer objective of both methods (memdlm-method.md section 2.1): t ~ U[eps, 1], M_t ~ Bernoulli(t)
over the response, weight 1/t, token normalisation by the maskable count. With the reference
Transformer the loss goes through `dd.masked_diffusion_loss_from_hidden` (only masked rows are
projected, docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

import diffusion as dd
from recipes.memdlm.backbones import Backbone, FullForward
from recipes.memdlm.data.batches import Batch
from recipes.memdlm.method.split import Split, last_split
from recipes.memdlm.method.trajectory import SCHEDULE, Anchor


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


def fused_head(backbone: Backbone, loss_backend: str | None) -> torch.Tensor | None:
    """The output head's weight when the fused loss applies, else None (the logits path).

    It applies to the reference `dd.Transformer` whose bias-free `lm_head` carries no hooks
    (a hook, e.g. fast weights on the head, must see the head's call), unless loss_backend is
    None. loss_backend: None, "auto", "reference" or "triton" (`diffusion.kernels`).
    """
    if loss_backend is None:
        return None
    return backbone.head_weight(loss_backend)


@dataclass(eq=False)
class SharedRows:
    """The scored rows of one state that several losses run the tail on (MemDLM's anchor: the
    inner step on it, the outer loss and the diagnostic, each under its own fast weights).

    The start of the tail on them (`Split.ffn_entry`: the last FFN's entry norm and the base
    products of its input-side linears) is computed once, by the first of those losses whose
    rows carry a gradient, and reused by the others (detached where their rows carry none):
    the same values, so each loss is what it would be alone, for 2 of the FFN's 3 products
    once instead of three times. Every loss given one `SharedRows` must score the same rows of
    the same hidden states (only their number is checked), after a split that shares them
    (`Split.shares_ffn`).
    """

    entry: Any = None

    def features(self, split: Split, rows: torch.Tensor) -> torch.Tensor:
        """`split.row_features(rows)` through the shared entry: (N, D) -> (N, D)."""
        entry = self.entry
        stale = entry is None or entry.rows.shape[0] != rows.shape[0]
        if stale or (rows.requires_grad and not entry.rows.requires_grad):
            entry = self.entry = split.ffn_entry(rows)
        elif not rows.requires_grad:
            entry = entry.detached()
        return split.entry_features(entry)


def head_loss(
    split: Split,
    hidden: torch.Tensor,
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
    shared: SharedRows | None = None,
) -> torch.Tensor:
    """The masked diffusion loss of the network after `split` and the head applied to `hidden`.

    head_grad=False: the fused loss treats the head's weight as a constant, so it skips the
    (V, D) weight-gradient products (the first-order inner loop differentiates phi only).
    per_sample: whether the fast weights bound around this call are per-sample (the caller
    knows: `InnerProblem.per_sample`, `cfg.per_sample`).
    When the network after the split acts on each position alone (`Split.position_wise`), it
    runs on the scored rows only (`tail_on_rows`): the same loss, at a fraction of the cost when
    few positions are masked. per_sample: the fast weights bound now are per sample.
    shared: the rows' tail start shared with other losses on the same rows (`SharedRows`;
    shared fast weights only).
    """
    head = fused_head(split.backbone, loss_backend)
    common = dict(schedule=SCHEDULE, maskable=maskable, normalize=normalize, weight=weight)
    if head is None:
        return dd.masked_diffusion_loss(split.logits(hidden), x0, mask, t, **common)
    row_map = tail_on_rows(split, mask, per_sample=per_sample, shared=shared)
    if row_map is None:
        hidden = split.features(hidden)
    return dd.masked_diffusion_loss_from_hidden(
        hidden, head if head_grad else head.detach(), x0, mask, t, backend=loss_backend,
        row_map=row_map, **common,
    )  # fmt: skip


def tail_on_rows(split: Split, mask: torch.Tensor, *, per_sample: bool, shared=None):
    """The network after `split` as a map of the scored rows (N, D) -> (N, D), for
    `dd.masked_diffusion_loss_from_hidden(row_map=...)`; None when it needs every position.

    Shared fast weights (or none) see each row alone. Per-sample fast weights index rows by
    sample, so the rows go back into a (B, M, D) batch first, M the most rows any sample has,
    padded with zeros (whose outputs are dropped). Under `torch.compile` the loss scores every
    position (static shapes), and the per-sample case takes the full path there.
    mask: (B, L) bool, the positions the loss scores. per_sample: per-sample fast weights
    are bound around the call. shared: a `SharedRows` for these rows (shared fast weights).
    """
    if not split.position_wise():
        return None
    if not per_sample:
        return split.row_features if shared is None else partial(shared.features, split)
    if torch.compiler.is_compiling():
        return None
    # One read-back (the rows per sample); the rest is index arithmetic on the device, in the
    # row-major order of the scored rows (sample by sample, positions ascending).
    counts = mask.sum(1)
    per_row = counts.tolist()
    total, width = sum(per_row), max([1, *per_row])
    samples = torch.repeat_interleave(torch.arange(len(per_row), device=mask.device), counts,
                                      output_size=total)  # fmt: skip
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts, output_size=total)
    slots = torch.arange(total, device=mask.device) - starts

    def packed_features(rows: torch.Tensor) -> torch.Tensor:
        packed = rows.new_zeros(mask.shape[0], width, rows.shape[-1])
        packed = packed.index_put((samples, slots), rows)
        return split.features(packed)[samples, slots]

    return packed_features


def standard_loss(
    backbone: Backbone,
    batch: Batch,
    anchor: Anchor,
    loss_backend: str | None = "auto",
    *,
    per_sample: bool = False,
):
    """The standard masked-diffusion loss on x_t (compile-clean). per_sample: per-sample fast
    weights are bound (evaluation after adaptation)."""
    if fused_head(backbone, loss_backend) is None:  # the module's own forward (FSDP gathers)
        return outer_loss(FullForward(backbone.module)(anchor.xt), batch, anchor)
    split = last_split(backbone)  # so that the last FFN runs on the masked rows only
    return head_loss(
        split,
        split.early(anchor.xt),
        batch.x0,
        anchor.mask,
        anchor.t,
        batch.maskable,
        normalize="token",
        loss_backend=loss_backend,
        per_sample=per_sample,
    )
