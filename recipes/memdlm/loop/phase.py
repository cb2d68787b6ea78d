"""The training phase, one process or torchrun: one phase = one folder with its checkpoints.

A phase folder holds `checkpoint.pt` (model, optimizer, scheduler, data position, generator
and RNG states; written atomically every `ckpt_every` steps, on Ctrl-C and at the end) and,
once finished, `model.pt`. Starting a phase whose folder has `model.pt` reuses it; one with only
`checkpoint.pt` resumes from it, and the losses after resuming equal an uninterrupted run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.memdlm.allocator import keep_freed_memory
from recipes.memdlm.backbones import Backbone, adapter
from recipes.memdlm.config import MemDLMConfig, PhaseConfig
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop import interrupts
from recipes.memdlm.loop.parallel import (
    Context,
    InnerSync,
    StepModule,
    clip,
    reduce_metrics,
    share_of,
)
from recipes.memdlm.loop.periodic import PeriodicEval
from recipes.memdlm.loop.plan import periods_in_steps
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.loop.schedule import lr_factor
from recipes.memdlm.loop.sharding import (
    DCP_FOLDER,
    find_unused,
    full_state_dict,
    load_dcp,
    save_dcp,
    shard_model,
)
from recipes.memdlm.loop.steps import (
    Counters,
    Interrupted,
    MetricsLog,
    PhaseResult,
    TrainingError,
    autocast_for,
    denormals_flushed,
    finished_phase,
    phase_generators,
    restore,
    resume_payload,
    summarise,
    update,
)
from recipes.memdlm.method import Generators, MemDLM, Standard


@dataclass(frozen=True)
class StepSettings:
    """What a step needs besides the model and the data (`phase_options` builds it from the
    configuration). method: "standard" or "memdlm", turned into a method object once
    (`build`). anchors: Standard only, independent anchors per batch, the loss averaged over
    them (the compute-matched control). sync_inner: all-reduce the inner gradients of shared
    fast weights across ranks. compiled: the steps through `torch.compile`."""

    method: str
    memdlm: MemDLMConfig
    mask_id: int
    time_eps: float = 1e-3
    loss_backend: str | None = "auto"
    compiled: bool = False
    sync_inner: bool = False
    anchors: int = 1

    def build(self, backbone: Backbone) -> Standard | MemDLM:
        """The method object (MemDLM attaches its fast weights: `close()` takes them off)."""
        if self.anchors < 1 or (self.anchors > 1 and self.method != "standard"):
            raise UserError(
                f"anchors={self.anchors}: more than one anchor per batch is for Standard"
            )
        if self.sync_inner and self.memdlm.per_sample and self.method == "memdlm":
            raise UserError(
                "distributed.sync_inner applies to shared fast weights; per-sample "
                "fast weights are already exact across ranks (memdlm.per_sample=true)"
            )
        options = {"mask_id": self.mask_id, "time_eps": self.time_eps}
        options["loss_backend"] = self.loss_backend
        if self.method == "standard":
            method = Standard(anchors=self.anchors, **options)
        else:
            method = MemDLM.on(backbone, self.memdlm, **options)
        return method.compiled() if self.compiled else method


def train_phase(
    model: nn.Module,
    settings: StepSettings,
    *,
    phase: PhaseConfig,
    sampler: BatchSampler,
    seed: int,
    folder: Path,
    log: MetricsLog,
    reporter: Reporter,
    ctx: Context | None = None,
    evaluate: PeriodicEval | None = None,
) -> PhaseResult:
    """Train `model` in place for `phase.steps` steps of `settings.method`, in one process
    (`ctx` None) or under torchrun (`ctx` from `parallel.init`): every rank draws the global
    step and keeps its rows, so N processes compute the one-process step (docs/scaling.md).
    Rank 0 writes the metrics and checkpoints (FSDP: every rank its shards). The loop itself
    is `run_steps`. evaluate: the held-out loss every `evaluate.every` steps. Returns the
    result on every rank."""
    phase = periods_in_steps(phase)  # ckpt_every 0.1 -> steps (loop/plan.py)
    keep_freed_memory()  # as the CLI does (allocator.py), for library callers too
    ctx = ctx or Context.single(next(model.parameters()).device)
    if (finished := finished_phase(folder, model, reporter)) is not None:
        return finished
    folder.mkdir(parents=True, exist_ok=True)
    resumed = resume_state(model, folder, ctx)
    backbone = adapter(model)  # resolved once: the method, the split and the losses use it
    method = settings.build(backbone)  # fast weights attached before DDP / FSDP wrap the model
    try:
        state = PhaseState.start(model, resumed, phase, sampler, seed, folder, ctx, reporter, log)
        method = method.placed(backbone)
        evals = None
        if evaluate is not None:  # Standard has no fast weights to adapt
            mem = getattr(method, "mem", None)
            evals = evaluate.before_steps(model, mem, log, write_log=ctx.is_main)
        model.train()
        label = f"{log.tags.get('phase')}/{settings.method}"
        with denormals_flushed():
            run_steps(method, backbone, state, settings.sync_inner, log, reporter, label, evals)
    finally:
        method.close()
    return state.finish(log)


def run_steps(
    method, backbone, state: PhaseState, sync_inner: bool, log, reporter, label, evals=None
) -> None:
    """The training loop, from the checkpoint's step to the last: draw the global step, keep
    this rank's rows, the loss, the metrics, update or skip, log, checkpoint. A non-finite loss
    or gradient norm skips the update (`phase.max_nonfinite_in_row` in a row: TrainingError);
    Ctrl-C finishes the step, checkpoints and raises Interrupted. evals(step): the periodic
    held-out evaluation, before the step's batch is drawn (`periodic.PeriodicEval`)."""
    phase, ctx, counters = state.phase, state.ctx, state.counters
    rows, precision = ctx.rows(phase.batch_size), autocast_for(ctx.device)  # chosen once
    gap_steps, distributed = method.gap_steps(phase.steps), ctx.distributed
    task = reporter.start(label, total=phase.steps)
    reporter.advance(task, counters.step)
    try:
        with interrupts.deferred() as stop:
            for step in range(counters.step, phase.steps):
                if evals is not None:
                    evals(step)
                started = time.perf_counter()
                batch = state.sampler.next().to(ctx.device)
                draws = method.draw(batch, state.generators)
                local, share = draws, 1.0  # one process keeps every row
                if distributed:
                    local = draws.rows(rows)
                    share = share_of(local, draws, ctx)
                sync = InnerSync.of(local, draws) if sync_inner else None
                options = {"log_gap": step in gap_steps, "share": share}
                options["grad_sync"] = None if sync is None else sync.transform()
                with precision:
                    loss, parts = state.run(partial(method.loss, backbone, local, **options))
                grad_norm = state.backward(loss)  # NaN for a non-finite loss: a skip
                record, norm = reduce_metrics(
                    step, loss, parts, method.per_sample, sync, ctx, grad_norm
                )
                updated = update(record, norm, state.optimizer, state.scheduler)
                elapsed = time.perf_counter() - started
                counters.count(record, updated, elapsed)
                record.update(seconds=elapsed, tokens=int(batch.x0.numel()))
                if ctx.is_main:
                    log.write(record)
                reporter.step(task, record, every=phase.log_every)
                state.checkpoint_after(step)
                if stop.requested:  # Ctrl-C during the step: it finished, now stop
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        state.save()
        raise Interrupted(f"interrupted at step {counters.step} of {state.folder}") from None
    finally:
        reporter.stop(task)


@dataclass
class PhaseState:
    """A phase's optimizer, schedule, data position, generators and counters (restored from
    its checkpoint when there is one), the model's runner (itself, DDP, or FSDP-sharded in
    place), and its checkpoint writer."""

    model: nn.Module
    phase: PhaseConfig
    sampler: BatchSampler
    folder: Path
    ctx: Context
    runner: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generators: Generators
    counters: Counters

    @classmethod
    def start(cls, model, resumed, phase, sampler, seed, folder, ctx, reporter, log):
        """Wrap the model (before the optimizer: FSDP2 replaces its parameters), build the
        optimizer and schedule, and restore `resumed` (or FSDP's sharded checkpoint)."""
        runner = _runner(model, ctx)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=phase.lr, betas=(0.9, 0.999), weight_decay=phase.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(phase))
        generators, counters = phase_generators(seed, ctx.device), Counters()
        if resumed is not None:
            restore(resumed, optimizer, scheduler, sampler, generators, counters)
        elif ctx.strategy == "fsdp" and (folder / DCP_FOLDER).exists():
            restore(
                load_dcp(folder, model, optimizer), None, scheduler, sampler, generators, counters
            )
        if ctx.is_main:  # as the single-process phase: records past the checkpoint are redone
            log.drop_after(counters.step - 1)
            ckpt.remove_stale_temporaries(folder)
        if counters.step:
            reporter.note(f"resuming {folder} at step {counters.step} on {ctx.world_size} ranks")
        return cls(
            model, phase, sampler, folder, ctx, runner, optimizer, scheduler, generators, counters
        )

    def run(self, compute):
        """`compute()` (the step's loss) through the runner: DDP needs its forward to run it."""
        if self.runner is None or self.ctx.strategy == "fsdp":
            return compute()
        return self.runner(lambda model: compute())

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's backward pass and global gradient clip; returns the gradient norm (a
        tensor: read back with the step's record). A non-finite loss gives non-finite
        gradients, so the step is skipped (`update`)."""
        (loss * self.ctx.world_size).backward()  # undo the mean over ranks of DDP / FSDP
        return clip(self.model, self.phase.grad_clip)

    def checkpoint_after(self, step: int) -> None:
        """Stop after `phase.max_nonfinite_in_row` skips in a row (checkpointed first), and
        checkpoint every `phase.ckpt_every` steps."""
        c = self.counters
        if c.in_row >= self.phase.max_nonfinite_in_row:
            self.save()
            raise TrainingError(
                f"{c.in_row} non-finite losses or gradients in a row at step {step}"
                f" ({c.skipped} skipped in total); lower the learning rate"
                " (train.lr / memdlm.inner_lr) or raise train.max_nonfinite_in_row"
            )
        if c.step % self.phase.ckpt_every == 0:
            self.save()

    def save(self) -> None:
        extra = resume_payload(
            self.optimizer, self.scheduler, self.sampler, self.generators, self.counters
        )
        if self.ctx.strategy == "fsdp":
            del extra["optimizer"]  # in the sharded part
            save_dcp(self.folder, self.model, self.optimizer, extra, self.ctx)
            return
        if self.ctx.is_main:
            ckpt.save(self.folder / "checkpoint.pt", {**ckpt.model_payload(self.model), **extra})
        self.ctx.barrier()

    def finish(self, log: MetricsLog) -> PhaseResult:
        """The last checkpoint, `model.pt` (full weights and the result), the result."""
        self.save()
        weights = full_state_dict(self.model, self.ctx)
        result = summarise(log.records(), self.counters) if self.ctx.is_main else None
        result = self.ctx.broadcast(result)
        if self.ctx.is_main:
            weights = ckpt.model_payload(self.model, weights)
            ckpt.save(self.folder / "model.pt", {**weights, "result": result.__dict__})
        self.ctx.barrier()
        return result


def resume_state(model, folder: Path, ctx: Context) -> dict[str, Any] | None:
    """The single-process/DDP checkpoint's state (its weights loaded into `model`), or None."""
    fsdp = ctx.strategy == "fsdp"
    if fsdp and (folder / "checkpoint.pt").exists() and not (folder / DCP_FOLDER).exists():
        raise UserError(
            f"{folder} holds a DDP/single-process checkpoint; resume it with "
            "distributed.strategy=ddp (FSDP resumes from checkpoint.dcp/)"
        )
    path = folder / "checkpoint.pt"
    if fsdp or not path.exists():
        return None
    state = ckpt.load(path)
    ckpt.load_model_state(model, state, path)
    return state


def _runner(model, ctx: Context):
    """None (one process: the step runs on the model), DDP, or FSDP2 (sharded in place)."""
    if ctx.strategy == "fsdp":
        return shard_model(model, ctx)
    if not ctx.distributed:
        return None
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        StepModule(model),
        device_ids=device_ids,
        forward_sync_buffers=False,
        find_unused_parameters=find_unused(model),
    )


# ------------------------------------------------------------------ shared by both trainers


def phase_options(cfg, data, method: str, **extra) -> StepSettings:
    """The `StepSettings` of `method` that follow from the configuration (`extra`: anchors,
    sync_inner)."""
    return StepSettings(
        method,
        cfg.memdlm,
        data.tokenizer.mask_id,
        time_eps=cfg.time_eps,
        loss_backend=cfg.loss_backend,
        compiled=cfg.compile,
        **extra,
    )
