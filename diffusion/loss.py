"""The masked diffusion objective: a Monte-Carlo estimate of the continuous-time NELBO.

For one sequence with mask M drawn at time t (MDLM eq. 10, LLaDA eq. 3):

    loss = weight(t) * sum_{i in M} -log p_theta(x0^i | x_t),
    weight(t) = -alpha'(t) / (1 - alpha(t))

Normalisations (the numerator is summed over the batch):
    "token"    divide by the number of maskable tokens in the batch (LLaDA SFT, dllm default);
               its expectation is the mean NELBO per maskable token;
    "masked"   divide by the number of masked tokens in the batch;
    "sequence" divide each row by its own number of maskable tokens, then average the rows that
               have at least one maskable token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_int, check_tensor, check_times
from .schedules import Schedule

__all__ = ["masked_diffusion_loss"]

NORMALIZATIONS = ("token", "masked", "sequence")
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
        normalize: "token", "masked" or "sequence" (see the module docstring).
        weight: optional (B,) per-row weights that replace `schedule.weight(t)` (e.g. ones for
            the uniform weighting of MemDLM's inference-time adaptation).
        reduction: "mean" returns the normalised scalar; "none" returns the (B, L) weighted
            per-token cross-entropy weight_b * CE_bi, zero where not masked (no normalisation).
        mask_id: optional; when given, x0 must not contain it at a maskable position (catches
            x_t passed in place of x0).

    Returns:
        A float32 (or float64) scalar, or (B, L) with reduction="none".
    """
    fn = "masked_diffusion_loss"
    check_tensor(fn, "logits", logits, ndim=3, dtype="float")
    batch, length, vocab = logits.shape
    check_tensor(fn, "x0", x0, ndim=2, dtype="long", shape=(batch, length))
    check_tensor(fn, "mask", mask, ndim=2, dtype="bool", shape=(batch, length))
    check_tensor(fn, "t", t, ndim=1, dtype="float", shape=(batch,))
    if maskable is not None:
        check_tensor(fn, "maskable", maskable, ndim=2, dtype="bool", shape=(batch, length))
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"{fn}: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        check_tensor(fn, "weight", weight, ndim=1, dtype="float", shape=(batch,))
    elif not hasattr(schedule, "weight"):
        raise TypeError(f"{fn}: schedule must be a Schedule, got {type(schedule).__name__}")
    check_times(fn, t, allow_zero=False)
    if maskable is not None and bool((mask & ~maskable).any()):
        raise ValueError(f"{fn}: mask has positions outside maskable; it must be a subset")
    targets = x0[mask].long()
    if targets.numel() and not (int(targets.min()) >= 0 and int(targets.max()) < vocab):
        raise ValueError(
            f"{fn}: x0 at masked positions must lie in [0, {vocab}) (the vocabulary of logits), "
            f"got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    if mask_id is not None:
        check_int(fn, "mask_id", mask_id, minimum=0)
        clean = x0 == mask_id if maskable is None else (x0 == mask_id) & maskable
        if bool(clean.any()):
            raise ValueError(
                f"{fn}: x0 contains mask_id={mask_id} at a maskable position; x0 must be the "
                "clean sequence, not x_t"
            )

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        # Only the masked rows are upcast: never a full (B, L, V) float32 copy of bf16 logits.
        ce = F.cross_entropy(logits[mask].to(compute_dtype), targets, reduction="none")
        row_weight = (weight if weight is not None else schedule.weight(t)).to(compute_dtype)
        per_token = torch.zeros((batch, length), dtype=compute_dtype, device=logits.device)
        per_token = per_token.masked_scatter(mask, ce) * row_weight[:, None]
        if reduction == "none":
            return per_token
        return _normalize(per_token, mask, maskable, normalize)


def _normalize(per_token: Tensor, mask: Tensor, maskable: Tensor | None, normalize: str) -> Tensor:
    length = per_token.shape[1]
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
