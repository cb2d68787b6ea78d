"""The training loop shared by both methods: one phase = one folder with its checkpoints.

A phase folder holds `checkpoint.pt` (model, optimizer, scheduler, data position, generator
and RNG states; written atomically every `ckpt_every` steps, on Ctrl-C and at the end) and,
once finished, `model.pt`. Starting a phase whose folder has `model.pt` reuses it; one with only
`checkpoint.pt` resumes from it, and the losses after resuming equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.memdlm.config import MemDLMConfig, PhaseConfig
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop import interrupts
from recipes.memdlm.loop.parallel import (
    DCP_FOLDER,
    Context,
    StepModule,
    clip,
    draw_global,
    find_unused,
    full_state_dict,
    inner_grad_sync,
    load_dcp,
    local_step,
    reduce_metrics,
    save_dcp,
    shard_model,
    sync_shares,
    take_rows,
)
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.loop.schedule import cosine_with_warmup
from recipes.memdlm.method import (
    compile_steps,
    make_fast_weights,
)


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

    def __init__(self, path: Path, tags: dict[str, Any]):
        self.path, self.tags = path, tags

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({**self.tags, **record}) + "\n")

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


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_phase(
    model: nn.Module,
    *,
    method: str,
    phase: PhaseConfig,
    memdlm: MemDLMConfig,
    sampler: BatchSampler,
    seed: int,
    folder: Path,
    log: MetricsLog,
    reporter: Reporter,
    mask_id: int,
    ctx: Context | None = None,
    time_eps: float = 1e-3,
    loss_backend: str | None = "auto",
    compiled: bool = False,
    sync_inner: bool = False,
) -> PhaseResult:
    """Train `model` in place for `phase.steps` steps with `method` ("standard" or "memdlm").

    The one training phase, for one process (`ctx` None) and for `torchrun` jobs alike
    (`ctx` from `parallel.init`): every rank draws the global batch and its random draws, keeps
    its rows (`parallel.take_rows`), and the loss is normalised by the global token count, so
    N processes compute the one-process step (docs/scaling.md). `model` is the unwrapped model
    on `ctx.device`, identical on every rank; it is wrapped here (DDP, or sharded in place with
    FSDP2). Rank 0 writes the metrics and the checkpoints (FSDP: every rank its shards).

    loss_backend: the fused loss's kernel ("auto", "reference", "triton") or None for the plain
    logits path (`method.fused_head`). compiled: run the steps through `torch.compile`
    (`method.compile_steps`; the first steps pay the compilation). sync_inner: all-reduce the
    inner gradients of shared fast weights across ranks. Returns the result on every rank.
    """
    if ctx is None:
        ctx = Context.single(next(model.parameters()).device)
    if sync_inner and memdlm.per_sample and method == "memdlm":
        raise ValueError(
            "distributed.sync_inner applies to shared fast weights; per-sample "
            "fast weights are already exact across ranks (memdlm.per_sample=true)"
        )
    rows = ctx.rows(phase.batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "model.pt"
    if (finished := finished_phase(folder, model, reporter)) is not None:
        return finished

    fsdp = ctx.strategy == "fsdp"
    if fsdp and (folder / "checkpoint.pt").exists() and not (folder / DCP_FOLDER).exists():
        raise ValueError(
            f"{folder} holds a DDP/single-process checkpoint; resume it with "
            "distributed.strategy=ddp (FSDP resumes from checkpoint.dcp/)"
        )
    resume_pt = None if fsdp else folder / "checkpoint.pt"
    resume_state = ckpt.load(resume_pt) if resume_pt is not None and resume_pt.exists() else None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])

    mem = make_fast_weights(model, memdlm) if method == "memdlm" else None
    runner = None  # one process: the step runs on the model itself
    if fsdp:
        runner = shard_model(model, ctx)
    elif ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(
            StepModule(model),
            device_ids=device_ids,
            forward_sync_buffers=False,
            find_unused_parameters=find_unused(model),
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=phase.lr, betas=(0.9, 0.999), weight_decay=phase.weight_decay
    )
    factor = cosine_with_warmup(phase.steps, phase.warmup_ratio, phase.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generators = phase_generators(seed, ctx.device)
    compiled_steps = compile_steps() if compiled else None
    counters = new_counters()

    def save_checkpoint() -> None:
        extra = resume_payload(optimizer, scheduler, sampler, generators, counters)
        if fsdp:
            del extra["optimizer"]  # in the sharded part
            save_dcp(folder, model, optimizer, extra, ctx)
            return
        if ctx.is_main:
            ckpt.save(folder / "checkpoint.pt", {"model": model.state_dict(), **extra})
        ctx.barrier()

    if resume_state is not None:
        restore(resume_state, optimizer, scheduler, sampler, generators, counters)
    elif fsdp and (folder / DCP_FOLDER).exists():
        restore(load_dcp(folder, model, optimizer), None, scheduler, sampler, generators, counters)
    if ctx.is_main:  # as the single-process phase: records past the checkpoint are redone
        log.drop_after(counters["step"] - 1)
        ckpt.remove_stale_temporaries(folder)
    if counters["step"]:
        reporter.note(f"resuming {folder} at step {counters['step']} on {ctx.world_size} ranks")

    def one_step(step: int) -> StepOutcome:
        draws = draw_global(
            sampler,
            generators,
            model=model,
            mem=mem,
            memdlm=memdlm,
            mask_id=mask_id,
            time_eps=time_eps,
            device=ctx.device,
        )
        local = take_rows(draws, rows, per_sample=memdlm.per_sample)
        n_global = int(draws.batch.maskable.sum())
        log_gap = mem is not None and step % memdlm.gap_every == 0
        options: dict[str, Any] = {"loss_backend": loss_backend, "compiled": compiled_steps}
        sync = None
        if mem is not None and sync_inner:
            sync = {"shares": sync_shares(local, draws), "record": []}
            options["grad_sync"] = inner_grad_sync(sync["shares"], sync["record"])

        def step_fn(net):
            return local_step(
                net,
                mem,
                local,
                n_global=n_global,
                memdlm=memdlm,
                mask_id=mask_id,
                log_gap=log_gap,
                options=options,
            )

        with autocast_for(ctx.device):
            loss, parts = runner(step_fn) if runner is not None and not fsdp else step_fn(model)
        record = reduce_metrics(step, loss, parts, memdlm.per_sample, sync, ctx)

        def backward() -> float:
            (loss * ctx.world_size).backward()  # undo the mean over ranks of DDP / FSDP
            return clip(model, phase.grad_clip)

        return StepOutcome(record, backward, int(draws.batch.x0.numel()))

    model.train()
    try:
        run_steps(
            one_step,
            phase=phase,
            optimizer=optimizer,
            scheduler=scheduler,
            counters=counters,
            save_checkpoint=save_checkpoint,
            log=log,
            reporter=reporter,
            label=f"{log.tags.get('phase')}/{method}",
            folder=folder,
            write_log=ctx.is_main,
        )
    finally:
        if mem is not None:
            mem.remove()

    save_checkpoint()
    weights = full_state_dict(model, ctx)
    result = summarise(log.records(), counters) if ctx.is_main else None
    result = ctx.broadcast(result)
    if ctx.is_main:
        ckpt.save(done, {"model": weights, "result": result.__dict__})
    ctx.barrier()
    return result


# ------------------------------------------------------------------ shared by both trainers


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


def phase_options(cfg, data) -> dict[str, Any]:
    """The keyword arguments of `train.train_phase` that follow from the configuration."""
    return {
        "memdlm": cfg.memdlm,
        "mask_id": data.tokenizer.mask_id,
        "time_eps": cfg.time_eps,
        "loss_backend": cfg.loss_backend,
        "compiled": cfg.compile,
    }
