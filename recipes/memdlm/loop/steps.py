"""What the training loop (`loop.phase.train_phase`) keeps and writes: the phase's metrics
log, generators, counters, resume state, the update-or-skip of one step, and the result."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.method import Generators


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite losses in a row)."""


class Interrupted(RuntimeError):
    """Ctrl-C: the phase was checkpointed and can be resumed."""


@dataclass
class PhaseResult:
    steps: int
    train_loss_final: float  # mean logged loss over the last 10% of steps
    seconds_per_step: float
    skipped_steps: int
    extra: dict[str, float] = field(default_factory=dict)
    inner_nonfinite_steps: int = 0  # of the skipped steps, those whose inner loop went non-finite


class MetricsLog:
    """Append-only JSONL, one record per step, flushed as it is written."""

    sink = None  # also gets every record, e.g. loop/tensorboard.py's TensorBoardSink (attach)

    def __init__(self, path: Path, tags: dict[str, Any]):
        self.path, self.tags = path, tags

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({**self.tags, **record}) + "\n")
        if self.sink is not None:
            self.sink.write({**self.tags, **record})

    def drop_after(self, step: int) -> None:
        """Forget this phase's records past `step` (they are redone after a resume)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            mine = all(record.get(k) == v for k, v in self.tags.items())
            if not (mine and record.get("step", -1) > step):
                kept.append(line)
        text = "".join(line + "\n" for line in kept)  # no record: an empty file, no blank line
        ckpt.atomic_write_bytes(self.path, lambda h: h.write(text.encode()))

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [r for r in rows if all(r.get(k) == v for k, v in self.tags.items())]


def phase_generators(seed: int, device: torch.device) -> Generators:
    """The phase's anchor and inner streams (`method.Generators`), seeded from `seed`."""
    return Generators(
        torch.Generator(device=device).manual_seed(1000 * seed + 1),
        torch.Generator(device=device).manual_seed(1000 * seed + 2),
    )


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Treat denormal floats as zero on the CPU while inside (this thread).

    Fine-tuning the shipped cpu-tiny base made every step 2.2x slower without it (0.35 s against
    0.16 s, one core): some of its values are denormal, and x86 arithmetic on denormals is slow.
    Values below 1.2e-38 do not move a float32 loss; the golden-loss tests run with it.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # the default; torch offers no way to read it


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def finished_phase(folder: Path, model: torch.nn.Module, reporter: Reporter) -> PhaseResult | None:
    """The result of a phase already finished in `folder` (its weights loaded), else None."""
    done = folder / "model.pt"
    if not done.exists():
        return None
    state = ckpt.load(done)
    ckpt.load_model_state(model, state, done)
    reporter.note(f"reusing finished phase {folder}")
    return PhaseResult(**state["result"])


@dataclass
class Counters:
    """Progress of a phase, saved in its checkpoints: steps done, skipped (in total, in a row,
    and of those with a non-finite inner loop), seconds spent."""

    step: int = 0
    skipped: int = 0
    in_row: int = 0
    seconds: float = 0.0
    inner_nonfinite: int = 0

    def count(self, record: dict[str, Any], updated: bool, seconds: float) -> None:
        """After the step of `record`: an update made, or a skip (`record` says why)."""
        if updated:
            self.in_row = 0
        else:
            self.skipped += 1
            self.inner_nonfinite += bool(record.get("inner_nonfinite"))
            self.in_row += 1
        self.step = record["step"] + 1
        self.seconds += seconds


def resume_payload(optimizer, scheduler, sampler, generators, counters) -> dict[str, Any]:
    """Everything but the weights that a resumed phase needs to repeat the same steps."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "generators": {k: g.get_state() for k, g in generators._asdict().items()},
        "rng": ckpt.rng_state(),
        "counters": dataclasses.asdict(counters),
    }


def restore(state, optimizer, scheduler, sampler, generators, counters) -> None:
    """Inverse of `resume_payload`; `optimizer` None when its state is loaded elsewhere (FSDP)."""
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    for name, generator in generators._asdict().items():
        generator.set_state(state["generators"][name])
    ckpt.set_rng_state(state["rng"])
    for name, value in state["counters"].items():
        setattr(counters, name, value)


def update(record, grad_norm: float, optimizer, scheduler) -> bool:
    """The optimizer step of a step whose loss and gradient norm are finite, else a skip; the
    schedule advances either way. Writes skipped, lr and grad_norm into `record`."""
    if not math.isfinite(record["loss"]):
        grad_norm = math.nan  # the backward pass ran on a non-finite loss: nothing to report
    updated = math.isfinite(grad_norm)
    if updated:
        optimizer.step()
    else:
        record["skipped"] = True
    optimizer.zero_grad(set_to_none=True)
    record.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm)
    with warnings.catch_warnings():
        # A skipped step still advances the schedule; torch warns about the order.
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return updated


def summarise(records: list[dict[str, Any]], counters: Counters) -> PhaseResult:
    tail = records[-max(1, len(records) // 10) :]

    def mean(key: str) -> float:
        values = [r[key] for r in tail if key in r and math.isfinite(r[key])]
        return sum(values) / len(values) if values else math.nan

    keys = ("loss_off", "gap", "inner_grad_norm_1", "inner_grad_norm_2", "inner_grad_norm_final")
    extra = {k: mean(k) for k in keys}
    return PhaseResult(
        steps=counters.step,
        train_loss_final=mean("loss"),
        seconds_per_step=counters.seconds / max(1, counters.step),
        skipped_steps=counters.skipped,
        inner_nonfinite_steps=counters.inner_nonfinite,
        extra={k: v for k, v in extra.items() if math.isfinite(v)},
    )
