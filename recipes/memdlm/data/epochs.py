"""Epoch batches: every training row once per epoch, optionally grouped by length as Hugging Face
Trainer's `group_by_length` (`train.epochs`, `train.group_by_length`).

The order of epoch e is a permutation drawn from a generator seeded with (seed, e), so a batch is
a function of (seed, epoch, position) alone: the sampler's state is those two numbers, and a
resumed run draws the batches of an uninterrupted one.

Length grouping follows transformers' `trainer_pt_utils.get_length_grouped_indices` (4.57):
a random permutation cut into megabatches of `mult * batch` rows, mult = min(rows // (4 batch),
50) and at least 1 (batch: the per-device batch, as the Trainer passes its `train_batch_size`);
each megabatch sorted by length, longest first (a stable sort: ties keep the permutation's
order); then the longest row of all swapped to the very first place, so that an out-of-memory
error comes at the first step. With the same torch generator state the order is the Trainer's
exactly (tests/recipes/data/test_epochs.py holds transformers' function as the oracle).

What differs from the Trainer: the generator (theirs is seeded by accelerate per epoch; ours by
the run's seed and the epoch), and the last batch of an epoch when the rows do not fill it: the
Trainer keeps it short on one process and accelerate (`even_batches`) fills it from the start
of the epoch's order on several; here it is always filled that way, so every step has the same
global batch on any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from recipes.memdlm.data.batches import Batch, Encoded, collate
from recipes.memdlm.data.tasks import DataError


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[int]:
    """Row indices of one epoch, in megabatches of similar lengths (module docstring).

    lengths: (N,) the rows' token counts; batch_size: the per-device batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    mult = max(1, min(len(lengths) // (batch_size * 4), 50))
    size = mult * batch_size
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    megabatches = [
        sorted(permutation[i : i + size], key=lambda j: lengths[j], reverse=True)
        for i in range(0, len(lengths), size)
    ]
    longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])
    first, top = megabatches[0], megabatches[longest]
    first[0], top[0] = top[0], first[0]  # argmax takes the first maximum, as torch.argmax
    return [i for megabatch in megabatches for i in megabatch]


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Batches in one epoch: ceil(rows / global batch), the last one filled (module doc)."""
    return math.ceil(rows / batch_size)


class EpochSampler:
    """Global batches of `batch_size` rows, each row once per epoch (the last batch of an
    epoch filled from the epoch's start), optionally length-grouped with megabatches of the
    per-device batch `group_batch` (= batch_size / processes). Same interface as BatchSampler.
    """

    def __init__(
        self,
        rows: Sequence[Encoded],
        batch_size: int,
        *,
        seed: int,
        eos_id: int,
        group_by_length: bool = False,
        group_batch: int | None = None,
    ):
        if not rows:
            raise ValueError("EpochSampler needs at least one row")
        self.rows, self.batch_size, self.eos_id = list(rows), batch_size, eos_id
        self.seed, self.group_by_length = seed, group_by_length
        self.group_batch = group_batch or batch_size
        self.epoch, self.position = 0, 0  # batches already drawn in this epoch
        self._order: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.rows), self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The row indices of `epoch`, a function of (seed, epoch) only."""
        if self._order is None or self._order[0] != epoch:
            # Distinct streams per epoch; 2**20 keeps (seed, epoch) pairs apart for any run.
            generator = torch.Generator().manual_seed(self.seed * 2**20 + epoch)
            if self.group_by_length:
                lengths = [len(row) for row in self.rows]
                indices = length_grouped_order(lengths, self.group_batch, generator)
            else:
                indices = torch.randperm(len(self.rows), generator=generator).tolist()
            self._order = (epoch, indices)
        return self._order[1]

    def indices(self, epoch: int, position: int) -> list[int]:
        """The rows of batch `position` of `epoch` (wrapping to the epoch's start)."""
        order = self.order(epoch)
        start = position * self.batch_size
        return [order[(start + k) % len(order)] for k in range(self.batch_size)]

    def next(self) -> Batch:
        picks = self.indices(self.epoch, self.position)
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return collate([self.rows[i] for i in picks], self.eos_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise DataError(
                f"the checkpoint was written with a global batch of {state['batch_size']} rows, "
                f"this run has {self.batch_size} (train.batch_per_device x processes): resume "
                "on the same number of processes"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
