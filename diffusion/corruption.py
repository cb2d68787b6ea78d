"""The forward (corruption) process: Bernoulli masking at time t, and nested noisier masks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_mask_id, check_tensor, check_times, debug_checks_enabled
from .schedules import Schedule

__all__ = ["corrupt", "nested_mask"]


def _check_maskable(fn: str, maskable: Tensor | None, shape: tuple) -> Tensor | None:
    if maskable is None:
        return None
    return check_tensor(fn, "maskable", maskable, ndim=2, dtype="bool", shape=shape)


def corrupt(
    x0: Tensor,
    t: Tensor,
    *,
    mask_id: int,
    schedule: Schedule,
    maskable: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample x_t ~ q(x_t | x_0): mask each maskable token independently with prob 1 - alpha(t).

    Args:
        x0: (B, L) integer clean tokens; must not contain `mask_id`.
        t: (B,) times in [0, 1], one per sequence; outside -> ValueError (always: it reads t
            back to the host once). That x0 holds no `mask_id` is checked under
            `dd.debug_checks(True)` only; types and shapes always.
        mask_id: the absorbing token id.
        schedule: a `Schedule`; the masking probability is `schedule.mask_prob(t)`.
        maskable: (B, L) bool or None (= every position). Positions where it is False (prompt,
            padding) are never masked.
        generator: optional `torch.Generator` for the uniforms.

    Returns:
        (xt, mask): xt (B, L) with `mask_id` exactly where mask (B, L) bool is True.
    """
    fn = "corrupt"
    check_tensor(fn, "x0", x0, ndim=2, dtype="long")
    batch, length = x0.shape
    check_tensor(fn, "t", t, ndim=1, dtype="float", shape=(batch,))
    check_mask_id(fn, mask_id)
    if not hasattr(schedule, "mask_prob"):
        raise TypeError(f"{fn}: schedule must be a Schedule, got {type(schedule).__name__}")
    maskable = _check_maskable(fn, maskable, (batch, length))
    # The public contract (shared/DESIGN.md): t outside [0, 1] is a ValueError, always. It
    # reads t's B values back (one sync per call); the costlier check of x0 is opt-in.
    check_times(fn, t, allow_zero=True)
    if debug_checks_enabled() and bool((x0 == mask_id).any()):
        raise ValueError(
            f"{fn}: x0 contains mask_id={mask_id}; x0 must be clean data (is it already x_t?)"
        )

    p_mask = schedule.mask_prob(t).to(torch.float64)
    u = torch.rand((batch, length), generator=generator, device=x0.device, dtype=torch.float64)
    mask = u < p_mask[:, None]
    if maskable is not None:
        mask &= maskable
    xt = torch.where(mask, torch.full_like(x0, mask_id), x0)
    return xt, mask


def nested_mask(
    mask: Tensor,
    ratio: float | Tensor,
    *,
    maskable: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A noisier mask that contains `mask`: MemDLM's pre-anchor state (memdlm-method.md 2.2).

    Per row b, with n = |maskable_b| and m = |mask_b|, the result masks exactly

        n_pre = min(n, max(m, floor(n * ratio_b)))

    positions: all of `mask_b` plus n_pre - m positions drawn uniformly without replacement from
    `maskable_b & ~mask_b`. floor(n * ratio) is taken in float64, as the reference code's
    `int(n * ratio)`.

    Args:
        mask: (B, L) bool, the anchor mask; must lie inside `maskable` (checked under
            `dd.debug_checks(True)`).
        ratio: float or (B,) float tensor, the target masked fraction of the maskable positions
            (>= 0; values above 1 mask every maskable position). A float is checked always, a
            tensor's values under `dd.debug_checks(True)`.
        maskable: (B, L) bool or None (= every position).
        generator: optional `torch.Generator`.

    Returns:
        (B, L) bool, a superset of `mask` inside `maskable`.
    """
    fn = "nested_mask"
    check_tensor(fn, "mask", mask, ndim=2, dtype="bool")
    batch, length = mask.shape
    maskable = _check_maskable(fn, maskable, (batch, length))
    if maskable is None:
        maskable = torch.ones_like(mask)
    ratio = _check_ratio(fn, ratio, batch, mask.device)
    if debug_checks_enabled() and bool((mask & ~maskable).any()):
        raise ValueError(f"{fn}: mask has positions outside maskable; it must be a subset")

    n_maskable = maskable.sum(1)
    n_masked = mask.sum(1)
    n_target = torch.floor(n_maskable.to(torch.float64) * ratio).long()
    n_pre = torch.minimum(n_maskable, torch.maximum(n_masked, n_target))
    n_extra = n_pre - n_masked

    candidates = maskable & ~mask
    # Uniform keys on the candidates, -1 elsewhere: the first n_extra positions in descending key
    # order are a uniformly random n_extra-subset of the candidates (n_extra <= #candidates).
    keys = torch.rand((batch, length), generator=generator, device=mask.device, dtype=torch.float64)
    keys = torch.where(candidates, keys, torch.full_like(keys, -1.0))
    order = keys.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(length, device=mask.device).expand(batch, length)
    )
    extra = candidates & (rank < n_extra[:, None])
    return mask | extra


def _check_ratio(fn: str, ratio, batch: int, device) -> Tensor:
    if isinstance(ratio, Tensor):
        if ratio.dim() == 0:
            ratio = ratio.expand(batch)
        check_tensor(fn, "ratio", ratio, ndim=1, dtype="float", shape=(batch,))
        ratio = ratio.to(device=device, dtype=torch.float64)
        if debug_checks_enabled() and not bool((torch.isfinite(ratio) & (ratio >= 0)).all()):
            raise ValueError(f"{fn}: ratio must be finite and >= 0, got {ratio.tolist()[:4]}")
        return ratio
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        if not (math.isfinite(ratio) and ratio >= 0):  # a Python number: no device read
            raise ValueError(f"{fn}: ratio must be finite and >= 0, got {ratio}")
        return torch.full((batch,), float(ratio), dtype=torch.float64, device=device)
    raise TypeError(f"{fn}: ratio must be a float or a (B,) tensor, got {type(ratio).__name__}")
