"""The masked diffusion objective: a Monte-Carlo estimate of the continuous-time NELBO.

For one sequence with mask M drawn at time t (MDLM eq. 10, LLaDA eq. 3):

    loss = weight(t) * sum_{i in M} -log p_theta(x0^i | x_t),
    weight(t) = -alpha'(t) / (1 - alpha(t))

Normalisations (the numerator is summed over the batch):
    "token"    divide by the number of maskable tokens in the batch (LLaDA SFT, dllm default);
               its expectation is the mean NELBO per maskable token;
    "masked"   divide by the number of masked tokens in the batch;
    "sequence" divide each row by its own number of maskable tokens, then average the rows that
               have at least one maskable token;
    "sum"      no division: the weighted sum itself.

`masked_diffusion_loss_from_hidden` computes the same loss from the hidden states and the output
projection, with a fused chunked cross-entropy that never forms the (tokens x V) logits
(`diffusion.kernels.linear_ce`).

Checks: types, dimensions, shapes and dtypes always; value checks (t in (0, 1], mask inside
maskable, targets inside the vocabulary, x0 free of mask_id) read values back to the host, so
they run only under the opt-in `dd.debug_checks(True)` (or DIFFUSION_DEBUG_CHECKS=1).

Rows: eagerly only the masked rows are gathered (`x[mask]`, a data-dependent shape: one host
read). `static_shapes=True` (the default while `torch.compile` traces) scores every row and
gives the unmasked ones weight zero instead: the same value and gradients, no host read and no
graph break, at the cost of scoring the unmasked rows too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_int, check_tensor, check_times, debug_checks_enabled
from .kernels.linear_ce import linear_cross_entropy
from .schedules import Schedule

__all__ = ["masked_diffusion_loss", "masked_diffusion_loss_from_hidden"]

NORMALIZATIONS = ("token", "masked", "sequence", "sum")
REDUCTIONS = ("mean", "none")


def masked_diffusion_loss(
    logits: Tensor,
    x0: Tensor,
    mask: Tensor,
    t: Tensor,
    *,
    schedule: Schedule,
    maskable: Tensor | None = None,
    normalize: str = "token",
    weight: Tensor | None = None,
    reduction: str = "mean",
    mask_id: int | None = None,
    static_shapes: bool | None = None,
) -> Tensor:
    """Weighted cross-entropy on the masked positions, in float32 (float64 if logits are).

    Args:
        logits: (B, L, V) denoiser outputs on x_t (any float dtype; upcast before the softmax,
            outside any autocast region).
        x0: (B, L) integer clean tokens (the targets).
        mask: (B, L) bool, the masked positions of x_t; must lie inside `maskable`.
        t: (B,) times in (0, 1].
        schedule: gives the per-row weight `schedule.weight(t)`.
        maskable: (B, L) bool or None (= every position): the denominator of "token" and
            "sequence" (e.g. the response, including EOS padding, in SFT).
        normalize: "token", "masked", "sequence" or "sum" (see the module docstring).
        weight: optional (B,) per-row weights that replace `schedule.weight(t)` (e.g. ones for
            the uniform weighting of MemDLM's inference-time adaptation).
        reduction: "mean" returns the normalised scalar; "none" returns the (B, L) weighted
            per-token cross-entropy weight_b * CE_bi, zero where not masked (no normalisation).
        mask_id: optional; when given, x0 must not contain it at a maskable position (catches
            x_t passed in place of x0; checked under `dd.debug_checks(True)`).
        static_shapes: score every row (True) or gather the masked rows (False); None: True
            while `torch.compile` traces, else False. Same value either way.

    Returns:
        A float32 (or float64) scalar, or (B, L) with reduction="none".
    """
    fn = "masked_diffusion_loss"
    check_tensor(fn, "logits", logits, ndim=3, dtype="float")
    batch, length, vocab = logits.shape
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_common(
        fn, (batch, length), x0, mask, t, schedule, maskable, normalize, weight, mask_id, vocab
    )

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        row_weight = (weight if weight is not None else schedule.weight(t)).to(compute_dtype)
        static = _static(static_shapes)
        per_token = _masked_cross_entropy(logits, x0, mask, compute_dtype, static)
        per_token = per_token * row_weight[:, None]
        if reduction == "none":
            return per_token
        return _normalize(per_token, mask, maskable, normalize)


def masked_diffusion_loss_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    x0: Tensor,
    mask: Tensor,
    t: Tensor,
    *,
    schedule: Schedule,
    maskable: Tensor | None = None,
    normalize: str = "token",
    weight: Tensor | None = None,
    mask_id: int | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    row_map: Callable[[Tensor], Tensor] | None = None,
    static_shapes: bool | None = None,
) -> Tensor:
    """`masked_diffusion_loss(hidden @ lm_head_weight.T, ...)` without forming the logits.

    Only the masked rows are projected, chunk by chunk, and the cross-entropy, its weights and
    its gradients are fused (`diffusion.kernels.linear_cross_entropy`): peak memory is one chunk
    of (C, V) logits instead of (B, L, V) and the float32 copy of the masked rows.

    Args:
        hidden: (B, L, D) the output projection's input (e.g. `model.norm(h)` of the reference
            Transformer); any float dtype, autocast is honoured for the matmuls.
        lm_head_weight: (V, D) the output projection's weight (a bias-free `lm_head`).
        x0, mask, t, schedule, maskable, normalize, weight, mask_id: as `masked_diffusion_loss`
            (reduction is always "mean"; use `normalize="sum"` for the plain weighted sum).
        backend: "auto", "reference" or "triton" (`diffusion.kernels.dispatch`).
        chunk_size: rows per chunk (None = a size whose logits match the rows' memory).
        row_map: optional position-wise map (N, D) -> (N, D) applied to the masked rows of
            `hidden` before the projection: the loss is then that of `row_map(hidden)`, computed
            on the scored rows only. It must act on each row alone (e.g. a network's last
            feed-forward sub-block and final norm, when no attention follows them).
        static_shapes: as `masked_diffusion_loss`: True projects every row (weight zero where
            not masked; `row_map` then sees (B L, D) rows), with no host read.

    Returns:
        A float32 (float64 for float64 inputs) scalar, differentiable with respect to `hidden`,
        `lm_head_weight`, `weight` (once, not twice) and whatever `row_map` closes over.
    """
    fn = "masked_diffusion_loss_from_hidden"
    check_tensor(fn, "hidden", hidden, ndim=3, dtype="float")
    check_tensor(fn, "lm_head_weight", lm_head_weight, ndim=2, dtype="float")
    batch, length, dim = hidden.shape
    if lm_head_weight.shape[1] != dim:
        raise ValueError(
            f"{fn}: lm_head_weight must have shape (V, {dim}) to match hidden, got "
            f"{tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    _check_common(
        fn, (batch, length), x0, mask, t, schedule, maskable, normalize, weight, mask_id, vocab
    )

    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    row_weight = (weight if weight is not None else schedule.weight(t)).to(compute_dtype)
    row_weight = row_weight * _row_scale(mask, maskable, normalize, compute_dtype)  # (B,)
    if _static(static_shapes):  # every row, weight 0 where not masked: no data-dependent shape
        rows = hidden.reshape(batch * length, dim)
        targets = torch.where(mask, x0, 0).reshape(-1)
        token_weight = torch.where(mask, row_weight[:, None], 0.0).reshape(-1)
    else:
        index = _masked_index(mask)  # one host read, shared by the three gathers
        rows = hidden.reshape(batch * length, dim).index_select(0, index)
        targets = x0.reshape(-1).index_select(0, index)
        token_weight = row_weight[:, None].expand(batch, length).reshape(-1).index_select(0, index)
    if row_map is not None:
        rows = row_map(rows)
    return linear_cross_entropy(
        rows, lm_head_weight, targets, token_weight, backend=backend, chunk_size=chunk_size
    )


def _check_common(
    fn, shape, x0, mask, t, schedule, maskable, normalize, weight, mask_id, vocab
) -> None:
    """Boundary checks shared by both losses: metadata always, values under the debug switch."""
    batch, length = shape
    check_tensor(fn, "x0", x0, ndim=2, dtype="long", shape=shape)
    check_tensor(fn, "mask", mask, ndim=2, dtype="bool", shape=(batch, length))
    check_tensor(fn, "t", t, ndim=1, dtype="float", shape=(batch,))
    if maskable is not None:
        check_tensor(fn, "maskable", maskable, ndim=2, dtype="bool", shape=(batch, length))
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"{fn}: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if weight is not None:
        check_tensor(fn, "weight", weight, ndim=1, dtype="float", shape=(batch,))
    elif not hasattr(schedule, "weight"):
        raise TypeError(f"{fn}: schedule must be a Schedule, got {type(schedule).__name__}")
    if mask_id is not None:
        check_int(fn, "mask_id", mask_id, minimum=0)
    if debug_checks_enabled():
        _check_values(fn, x0, mask, t, maskable, mask_id, vocab)


def _check_values(fn, x0, mask, t, maskable, mask_id, vocab) -> None:
    """The value checks (each reads tensors back to the host): only under the debug switch."""
    check_times(fn, t, allow_zero=False)
    if maskable is not None and bool((mask & ~maskable).any()):
        raise ValueError(f"{fn}: mask has positions outside maskable; it must be a subset")
    targets = x0[mask]
    if targets.numel() and not (int(targets.min()) >= 0 and int(targets.max()) < vocab):
        raise ValueError(
            f"{fn}: x0 at masked positions must lie in [0, {vocab}) (the vocabulary of logits), "
            f"got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    if mask_id is not None:
        clean = x0 == mask_id if maskable is None else (x0 == mask_id) & maskable
        if bool(clean.any()):
            raise ValueError(
                f"{fn}: x0 contains mask_id={mask_id} at a maskable position; x0 must be the "
                "clean sequence, not x_t"
            )


def _static(static_shapes: bool | None) -> bool:
    """Whether to score every row: as asked, or by default only while compiling."""
    if static_shapes is None:
        return torch.compiler.is_compiling()
    if not isinstance(static_shapes, bool):
        raise TypeError(f"static_shapes must be None or a bool, got {static_shapes!r}")
    return static_shapes


def _masked_cross_entropy(
    logits: Tensor, x0: Tensor, mask: Tensor, dtype: torch.dtype, static: bool
) -> Tensor:
    """(B, L) cross-entropy at the masked positions, zero elsewhere, in `dtype`.

    Gathered (static=False): only the masked rows are upcast (never a full (B, L, V) float32
    copy of bf16 logits), one host read for the row count. Static: every row is scored (no
    data-dependent shape); inductor fuses the upcast.
    """
    if static:
        ce = F.cross_entropy(
            logits.to(dtype).transpose(1, 2), torch.where(mask, x0, 0).long(), reduction="none"
        )
        return torch.where(mask, ce, 0.0)
    index = _masked_index(mask)
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index)
    ce = F.cross_entropy(
        rows.to(dtype), x0.reshape(-1).index_select(0, index).long(), reduction="none"
    )
    per_token = torch.zeros(mask.numel(), dtype=dtype, device=logits.device)
    return per_token.index_put((index,), ce).reshape(mask.shape)


def _masked_index(mask: Tensor) -> Tensor:
    """(N,) flat indices of the True entries of `mask` (B, L), row-major (the order of
    `x[mask]`): the one host read of the gathered path (N is data-dependent)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def _row_scale(mask: Tensor, maskable: Tensor | None, normalize: str, dtype: torch.dtype) -> Tensor:
    """(B,) factors c_b with loss = sum_b c_b sum_{i in M_b} weight_b CE_bi (cf. `_normalize`)."""
    batch, length = mask.shape
    n_maskable = (
        maskable.sum(1)
        if maskable is not None
        else torch.full_like(mask[:, 0], length, dtype=torch.long)
    ).to(dtype)
    if normalize == "sum":
        return torch.ones(batch, dtype=dtype, device=mask.device)
    if normalize == "masked":
        return (1.0 / mask.sum().clamp(min=1).to(dtype)).expand(batch)
    if normalize == "token":
        return (1.0 / n_maskable.sum().clamp(min=1)).expand(batch)
    has_data = n_maskable > 0  # "sequence"
    return has_data / (n_maskable.clamp(min=1) * has_data.sum().clamp(min=1))


def _normalize(per_token: Tensor, mask: Tensor, maskable: Tensor | None, normalize: str) -> Tensor:
    length = per_token.shape[1]
    if normalize == "sum":
        return per_token.sum()
    if normalize == "masked":
        return per_token.sum() / mask.sum().clamp(min=1)
    n_maskable = (
        maskable.sum(1)
        if maskable is not None
        else torch.full_like(mask[:, 0], length, dtype=torch.long)
    )
    if normalize == "token":
        return per_token.sum() / n_maskable.sum().clamp(min=1)
    # "sequence": rows without maskable tokens carry no data and are left out of the mean.
    has_data = n_maskable > 0
    per_row = per_token.sum(1) / n_maskable.clamp(min=1)
    return (per_row * has_data).sum() / has_data.sum().clamp(min=1)
