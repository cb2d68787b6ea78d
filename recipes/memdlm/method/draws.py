"""Everything random in one training step, drawn before any model call: `Draws`.

The batch comes from the data sampler; the anchor (t, M_t) from the anchor stream; the rest
(the inner trajectory's masks, phi_0, the leak-free control's outer positions, or Standard's
extra anchors) from the inner stream, in that order. Drawing first makes the rest of the step
one deterministic, compile-clean function, and lets every rank of a torchrun job draw the
global step and keep its rows (`Draws.rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch
from recipes.memdlm.method.losses import Anchor
from recipes.memdlm.method.trajectory import (
    loss_masks,
    outer_positions,
    realised_ratio,
    state_times,
    teacher_masks,
    trajectory_masks,
    without_outer,
)


class Generators(NamedTuple):
    """A phase's two random streams. The anchors (t, M_t) depend only on the seed and the
    step, so Standard and MemDLM runs with one seed see identical batches and anchor masks."""

    anchor: torch.Generator
    inner: torch.Generator


@dataclass
class Draws:
    """One step's draws. batch, anchor: the global batch and its x_t (both methods).

    MemDLM: per inner step its input mask, loss mask, look-ahead mask (`teacher_masks`; None =
    the clean x0) and the t of its 1/t weight (B,) float64; `anchor_index`, the inner step
    whose input is the anchor x_t itself (its early hidden states are the outer pass's), or
    None; phi_0; the leak-free control's outer positions O (None unless `leak_free`).
    Standard with more than one anchor per batch (the compute-matched control): the extras.
    """

    batch: Batch
    anchor: Anchor
    inputs: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    teachers: list[torch.Tensor | None] = field(default_factory=list)
    times: list[torch.Tensor] = field(default_factory=list)
    anchor_index: int | None = None
    phi0: dict[str, torch.Tensor] | None = None
    outer: torch.Tensor | None = None
    extra_anchors: list[Anchor] = field(default_factory=list)

    def rows(self, rows: slice, *, per_sample: bool) -> Draws:
        """The rows that belong to one rank; a shared phi_0 (no batch dim) is every rank's."""

        def of(tensor):
            return None if tensor is None else tensor[rows]

        def anchor_of(a: Anchor) -> Anchor:
            return Anchor(a.t[rows], a.mask[rows], a.xt[rows])

        b, phi0 = self.batch, self.phi0
        if phi0 is not None and per_sample:
            phi0 = {k: v[rows] for k, v in phi0.items()}
        return replace(
            self,
            batch=Batch(b.x0[rows], b.maskable[rows], b.prompt_lengths[rows]),
            anchor=anchor_of(self.anchor),
            inputs=[of(m) for m in self.inputs],
            targets=[of(m) for m in self.targets],
            teachers=[of(m) for m in self.teachers],
            times=[of(t) for t in self.times],
            phi0=phi0,
            outer=of(self.outer),
            extra_anchors=[anchor_of(a) for a in self.extra_anchors],
        )


def inner_draws(batch: Batch, anchor: Anchor, cfg: MemDLMConfig, generator, init_phi) -> Draws:
    """MemDLM's draws after the anchor, from `generator`: the trajectory's masks, then phi_0
    (`init_phi(generator)`), then (leak_free) the outer positions O, which every inner input
    and teacher input then masks and no inner loss scores. Also each step's weight time:
    `trajectory.state_times` where the strategy names one, else the input's realised mask
    ratio (floored at 1e-6: a row with nothing masked has no loss terms)."""
    inputs = trajectory_masks(anchor.mask, batch.maskable, cfg, generator)
    teachers = teacher_masks(inputs, anchor.mask, cfg)
    targets = loss_masks(inputs, anchor.mask, cfg.inner_loss_mask, teachers)
    phi0 = init_phi(generator)
    outer = None
    if cfg.leak_free:
        outer = outer_positions(anchor.mask, cfg.leak_free_fraction, generator)
        inputs, targets, teachers = without_outer(inputs, targets, teachers, outer)
    nominal = state_times(cfg, anchor.t, len(inputs))
    times = [
        (realised_ratio(m, batch.maskable) if t is None else t.double()).clamp(min=1e-6)
        for m, t in zip(inputs, nominal)
    ]
    # The last step's input is the anchor itself for pmc, anchor_only and no_progressive
    # (leak-free too: O lies inside M_t); pre_only and progressive_memory never reach it.
    tied = cfg.strategy not in ("pre_only", "progressive_memory")
    index = len(inputs) - 1 if tied else None
    return Draws(batch, anchor, inputs, targets, teachers, times, index, phi0, outer)
