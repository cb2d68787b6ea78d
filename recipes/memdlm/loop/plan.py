"""A phase's plan: its steps, global batch and periods, resolved from the configuration as
Hugging Face Trainer resolves `num_train_epochs`, `per_device_train_batch_size` and fractional
`eval_steps`/`save_steps` (transformers 4.57, `Trainer._inner_training_loop`):

    global batch     = batch_per_device x processes        (else train.batch_size)
    steps per epoch  = ceil(rows / global batch)            (data/epochs.py fills the last batch)
    steps            = ceil(epochs x steps per epoch)       (else train.steps)
    every (fraction) = ceil(fraction x steps)               (else the number of steps given)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from recipes.memdlm.config import PhaseConfig
from recipes.memdlm.data.batches import BatchSampler, Encoded
from recipes.memdlm.data.epochs import EpochSampler, steps_per_epoch


def every_steps(value: int | float, total: int) -> int:
    """A period in steps: an int is steps; a float in (0, 1) is ceil(value * total)."""
    if isinstance(value, float):
        return max(1, math.ceil(value * total))
    return value


@dataclass(frozen=True)
class Plan:
    steps: int
    batch_size: int  # global, all processes together
    per_device: int
    rows: int
    epochs: float | None
    steps_per_epoch: int | None  # None: batches drawn at random, not by epoch
    ckpt_every: int
    eval_every: int | None

    def describe(self) -> str:
        """One line for the start of training."""
        if self.epochs is not None:
            how = (
                f"{self.epochs:g} epochs x {self.steps_per_epoch} steps "
                f"(ceil({self.rows} rows / {self.batch_size}))"
            )
        else:
            how = "train.steps"
        every = f"checkpoint every {self.ckpt_every} steps"
        if self.eval_every is not None:
            every += f", held-out loss every {self.eval_every}"
        return (
            f"plan: {self.steps} steps = {how}; global batch {self.batch_size} "
            f"({self.per_device} per process); {every}"
        )


def plan_phase(phase: PhaseConfig, rows: int, world_size: int = 1) -> Plan:
    """The plan of `phase` over `rows` training rows on `world_size` processes."""
    batch = phase.batch_per_device * world_size if phase.batch_per_device else phase.batch_size
    per_epoch = None
    if phase.epochs is not None or phase.group_by_length:
        per_epoch = steps_per_epoch(rows, batch)
    steps = math.ceil(phase.epochs * per_epoch) if phase.epochs is not None else phase.steps
    eval_every = None if phase.eval_every is None else every_steps(phase.eval_every, steps)
    return Plan(
        steps=steps,
        batch_size=batch,
        per_device=batch // world_size,
        rows=rows,
        epochs=phase.epochs,
        steps_per_epoch=per_epoch,
        ckpt_every=every_steps(phase.ckpt_every, steps),
        eval_every=eval_every,
    )


def resolved(phase: PhaseConfig, plan: Plan) -> PhaseConfig:
    """`phase` with the plan's steps, global batch and checkpoint period written in, as the
    step loop reads them (`run_steps`: `steps`, `batch_size`, an integer `ckpt_every`)."""
    update = {"steps": plan.steps, "batch_size": plan.batch_size, "ckpt_every": plan.ckpt_every}
    return phase.model_copy(update=update)


def periods_in_steps(phase: PhaseConfig) -> PhaseConfig:
    """`phase` with a fractional `ckpt_every` turned into steps of `phase.steps` (idempotent)."""
    return phase.model_copy(update={"ckpt_every": every_steps(phase.ckpt_every, phase.steps)})


def sampler_for(
    phase: PhaseConfig, plan: Plan, rows: Sequence[Encoded], *, seed: int, eos_id: int
) -> BatchSampler | EpochSampler:
    """Epoch batches (`epochs` or `group_by_length` set) or the random BatchSampler."""
    if plan.steps_per_epoch is None:
        return BatchSampler(rows, plan.batch_size, seed=seed, eos_id=eos_id)
    return EpochSampler(
        rows,
        plan.batch_size,
        seed=seed,
        eos_id=eos_id,
        group_by_length=phase.group_by_length,
        group_batch=plan.per_device,
    )
