"""The logged metrics also as TensorBoard event files (`train.tensorboard`, `pretrain.tensorboard`).

A sink of `MetricsLog` (loop/steps.py): every record the log writes to metrics.jsonl is
forwarded here, and each of its numbers (not its tags, not "step") becomes a scalar of the same
name at the record's step, in `<phase folder>/tensorboard/`, through
`torch.utils.tensorboard.SummaryWriter` (the `tensorboard` package). Written and flushed as the
log is, by the process that writes the log.

A resumed phase redoes the steps after its checkpoint: the writer opens with `purge_step` at the
first step it is given, which tells TensorBoard to drop the events of that step and later that an
interrupted session had written, as `MetricsLog.drop_after` drops their records.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from recipes.memdlm.errors import UserError

FOLDER = "tensorboard"  # under the phase's run folder
NOT_SCALARS = {"step", "phase", "method", "seed"}  # the record's position and the log's tags


def summary_writer_class():
    """`torch.utils.tensorboard.SummaryWriter`; a missing `tensorboard` package is one line."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "train.tensorboard (or pretrain.tensorboard) needs the tensorboard package: "
            "pip install tensorboard (or the project's [tensorboard] extra)"
        ) from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by name: ints and floats (NaN and inf kept: a diverging loss should
    show), without booleans, strings, nested values or NOT_SCALARS."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_SCALARS
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
    }


class TensorBoardSink:
    """Forwarded metric records -> scalars in `folder` (event files), one writer per process."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.writer_class = summary_writer_class()  # checked now, before the phase starts
        self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return  # not a step record: nothing to place on the curves
        if self.writer is None:  # first record of this session: drop a previous one's later steps
            self.writer = self.writer_class(log_dir=str(self.folder), purge_step=step)
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def attach(log, enabled: bool, folder: Path) -> None:
    """Forward `log`'s records to TensorBoard events in `folder`/tensorboard when `enabled`
    (the phase's `tensorboard` setting); `log` is a `MetricsLog`."""
    if enabled:
        log.sink = TensorBoardSink(Path(folder) / FOLDER)
