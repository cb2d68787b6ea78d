"""The step loop under every training phase: update or skip, log, checkpoint, Ctrl-C; the
phase's metrics log, counters, resume state and result."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.config import PhaseConfig
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop import interrupts
from recipes.memdlm.loop.progress import Reporter


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


def phase_generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    # Separate streams: the anchors (t, M_t) depend only on the seed and the step, so Standard
    # and MemDLM runs with one seed see identical batches and identical anchor masks.
    return {
        "anchor": torch.Generator(device=device).manual_seed(1000 * seed + 1),
        "inner": torch.Generator(device=device).manual_seed(1000 * seed + 2),
    }


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
    model.load_state_dict(state["model"])
    reporter.note(f"reusing finished phase {folder}")
    return PhaseResult(**state["result"])


def new_counters() -> dict[str, Any]:
    """Progress of a phase, saved in its checkpoints: steps done, skipped, skipped in a row."""
    return {"step": 0, "skipped": 0, "in_row": 0, "seconds": 0.0, "inner_nonfinite": 0}


def resume_payload(optimizer, scheduler, sampler, generators, counters) -> dict[str, Any]:
    """Everything but the weights that a resumed phase needs to repeat the same steps."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "generators": {k: g.get_state() for k, g in generators.items()},
        "rng": ckpt.rng_state(),
        "counters": dict(counters),
    }


def restore(state, optimizer, scheduler, sampler, generators, counters) -> None:
    """Inverse of `resume_payload`; `optimizer` None when its state is loaded elsewhere (FSDP)."""
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    ckpt.set_rng_state(state["rng"])
    counters.update(state["counters"])


@dataclass
class StepOutcome:
    """One step's forward result, before its update.

    record: the step's metrics, with at least "step" and "loss" (a float, possibly non-finite).
    backward: runs the backward pass and gradient clipping, returns the global gradient norm.
    tokens: tokens in the (global) batch, for the throughput shown and logged.
    """

    record: dict[str, Any]
    backward: Callable[[], float]
    tokens: int


def run_steps(
    one_step: Callable[[int], StepOutcome],
    *,
    phase: PhaseConfig,
    optimizer: torch.optim.Optimizer,
    scheduler,
    counters: dict[str, Any],
    save_checkpoint: Callable[[], None],
    log: MetricsLog,
    reporter: Reporter,
    label: str,
    folder: Path,
    write_log: bool = True,
) -> None:
    """Run `one_step` from `counters["step"]` to `phase.steps`: update or skip, log, checkpoint.

    A non-finite loss or gradient norm skips the update (counted; the schedule still advances);
    `phase.max_nonfinite_in_row` of them in a row checkpoint and raise TrainingError. A checkpoint
    is written every `phase.ckpt_every` steps and on Ctrl-C (then Interrupted is raised).
    """
    task = reporter.start(label, total=phase.steps)
    reporter.advance(task, counters["step"])
    try:
        with interrupts.deferred() as stop:
            while counters["step"] < phase.steps:
                run_one(
                    one_step,
                    phase,
                    optimizer,
                    scheduler,
                    counters,
                    log,
                    reporter,
                    task,
                    write_log=write_log,
                    save_checkpoint=save_checkpoint,
                )
                if stop.requested:  # Ctrl-C during the step: it finished, now stop
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        save_checkpoint()
        raise Interrupted(f"interrupted at step {counters['step']} of {folder}") from None
    finally:
        reporter.stop(task)


def run_one(
    one_step,
    phase,
    optimizer,
    scheduler,
    counters,
    log,
    reporter,
    task,
    *,
    write_log,
    save_checkpoint,
) -> None:
    """One step of `run_steps`: forward, update or skip, log, periodic checkpoint."""
    step = counters["step"]
    started = time.perf_counter()
    outcome = one_step(step)
    record = outcome.record
    _update(record, outcome.backward, optimizer, scheduler, counters)
    elapsed = time.perf_counter() - started
    counters["seconds"] += elapsed
    counters["step"] = step + 1
    record.update(seconds=elapsed, tokens=outcome.tokens)
    if write_log:
        log.write(record)
    reporter.step(task, record, every=phase.log_every)
    if counters["in_row"] >= phase.max_nonfinite_in_row:
        save_checkpoint()
        raise TrainingError(
            f"{counters['in_row']} non-finite losses or gradients in a row at step {step}"
            f" ({counters['skipped']} skipped in total); lower the learning rate"
            " (train.lr / memdlm.inner_lr) or raise train.max_nonfinite_in_row"
        )
    if counters["step"] % phase.ckpt_every == 0:
        save_checkpoint()


def _update(record, backward, optimizer, scheduler, counters) -> None:
    grad_norm = math.nan
    if math.isfinite(record["loss"]):
        grad_norm = backward()
    if math.isfinite(grad_norm):
        optimizer.step()
        counters["in_row"] = 0
    else:
        counters["skipped"] += 1
        counters["inner_nonfinite"] += bool(record.get("inner_nonfinite"))
        counters["in_row"] += 1
        record["skipped"] = True
    optimizer.zero_grad(set_to_none=True)
    record.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm)
    with warnings.catch_warnings():
        # A skipped step still advances the schedule; torch warns about the order.
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def summarise(records: list[dict[str, Any]], counters: dict[str, Any]) -> PhaseResult:
    tail = records[-max(1, len(records) // 10) :]

    def mean(key: str) -> float:
        values = [r[key] for r in tail if key in r and math.isfinite(r[key])]
        return sum(values) / len(values) if values else math.nan

    extra = {k: mean(k) for k in ("loss_off", "gap", "inner_grad_norm_1", "inner_grad_norm_2")}
    return PhaseResult(
        steps=counters["step"],
        train_loss_final=mean("loss"),
        seconds_per_step=counters["seconds"] / max(1, counters["step"]),
        skipped_steps=counters["skipped"],
        inner_nonfinite_steps=counters.get("inner_nonfinite", 0),
        extra={k: v for k, v in extra.items() if math.isfinite(v)},
    )
