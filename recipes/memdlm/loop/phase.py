"""The training phase, one process or torchrun: one phase = one folder with its checkpoints.

A phase folder holds `checkpoint.pt` (model, optimizer, scheduler, data position, generator
and RNG states; written atomically every `ckpt_every` steps, on Ctrl-C and at the end) and,
once finished, `model.pt`. Starting a phase whose folder has `model.pt` reuses it; one with only
`checkpoint.pt` resumes from it, and the losses after resuming equal an uninterrupted run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.memdlm.allocator import keep_freed_memory
from recipes.memdlm.config import MemDLMConfig, PhaseConfig
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.parallel import (
    Context,
    StepModule,
    clip,
    inner_grad_sync,
    reduce_metrics,
    sync_shares,
)
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.loop.schedule import cosine_with_warmup
from recipes.memdlm.loop.sharding import (
    DCP_FOLDER,
    find_unused,
    full_state_dict,
    load_dcp,
    save_dcp,
    shard_model,
)
from recipes.memdlm.loop.steps import (
    MetricsLog,
    PhaseResult,
    StepOutcome,
    autocast_for,
    denormals_flushed,
    finished_phase,
    new_counters,
    phase_generators,
    restore,
    resume_payload,
    run_steps,
    summarise,
)
from recipes.memdlm.method import (
    compile_steps,
    draw,
    make_fast_weights,
    sample_anchor,
    step_loss,
)


@dataclass
class StepSettings:
    """What a step needs besides the model and the data (`phase_options` builds it from the
    configuration). anchors: Standard only, independent anchors per batch, the loss averaged
    over them (the compute-matched control). sync_inner: all-reduce the inner gradients of
    shared fast weights across ranks. compiled: the steps through `torch.compile`."""

    method: str
    memdlm: MemDLMConfig
    mask_id: int
    time_eps: float = 1e-3
    loss_backend: str | None = "auto"
    compiled: bool = False
    sync_inner: bool = False
    anchors: int = 1


def train_phase(
    model: nn.Module,
    *,
    phase: PhaseConfig,
    sampler: BatchSampler,
    seed: int,
    folder: Path,
    log: MetricsLog,
    reporter: Reporter,
    ctx: Context | None = None,
    **settings,
) -> PhaseResult:
    """Train `model` in place for `phase.steps` steps of `settings.method` ("standard" or
    "memdlm"; `StepSettings` fields as keywords), in one process (`ctx` None) or under torchrun
    (`ctx` from `parallel.init`): every rank draws the global step and keeps its rows, so N
    processes compute the one-process step (docs/scaling.md). Rank 0 writes the metrics and
    checkpoints (FSDP: every rank its shards). Returns the result on every rank."""
    s = StepSettings(**settings)
    keep_freed_memory()  # as the CLI does (allocator.py), for library callers too
    ctx = ctx or Context.single(next(model.parameters()).device)
    check_settings(s)
    if (finished := finished_phase(folder, model, reporter)) is not None:
        return finished
    folder.mkdir(parents=True, exist_ok=True)
    resumed = resume_state(model, folder, ctx)
    mem = make_fast_weights(model, s.memdlm) if s.method == "memdlm" else None
    state = PhaseState.start(model, resumed, phase, sampler, seed, folder, ctx, reporter, log)
    one_step = step_function(model, mem, s, state, ctx)
    model.train()
    try:
        with denormals_flushed():
            run_steps(
                one_step,
                phase=phase,
                optimizer=state.optimizer,
                scheduler=state.scheduler,
                counters=state.counters,
                save_checkpoint=state.save,
                log=log,
                reporter=reporter,
                label=f"{log.tags.get('phase')}/{s.method}",
                folder=folder,
                write_log=ctx.is_main,
            )
    finally:
        if mem is not None:
            mem.remove()
    return state.finish(log)


def check_settings(s: StepSettings) -> None:
    if s.anchors < 1 or (s.anchors > 1 and s.method != "standard"):
        raise UserError(f"anchors={s.anchors}: more than one anchor per batch is for Standard")
    if s.sync_inner and s.memdlm.per_sample and s.method == "memdlm":
        raise UserError(
            "distributed.sync_inner applies to shared fast weights; per-sample "
            "fast weights are already exact across ranks (memdlm.per_sample=true)"
        )


def step_function(model, mem, s: StepSettings, state: PhaseState, ctx: Context):
    """`one_step(step) -> StepOutcome` for `run_steps`: draw the global step (`method.draw`),
    keep this rank's rows, compute the loss (`method.step_loss`), reduce the metrics."""
    rows = ctx.rows(state.phase.batch_size)
    compiled = compile_steps() if s.compiled else None
    generators = state.generators

    def one_step(step: int) -> StepOutcome:
        batch = state.sampler.next().to(ctx.device)
        anchor = sample_anchor(
            batch, mask_id=s.mask_id, eps=s.time_eps, generator=generators["anchor"]
        )
        draws = draw(
            model, mem, batch, anchor, s.memdlm, generators["inner"],
            mask_id=s.mask_id, time_eps=s.time_eps, anchors=s.anchors,
        )  # fmt: skip
        local = draws.rows(rows, per_sample=s.memdlm.per_sample)
        share = int(local.batch.maskable.sum()) / max(1, int(batch.maskable.sum()))
        sync = None
        if mem is not None and s.sync_inner:
            sync = {"shares": sync_shares(local, draws), "record": []}

        def loss_of(net):
            return step_loss(
                net, mem, local, s.memdlm, mask_id=s.mask_id,
                log_gap=mem is not None and step % s.memdlm.gap_every == 0,
                loss_backend=s.loss_backend, compiled=compiled, share=share,
                grad_sync=None if sync is None else inner_grad_sync(sync["shares"], sync["record"]),
            )  # fmt: skip

        with autocast_for(ctx.device):
            loss, parts = state.run(loss_of)
        record = reduce_metrics(step, loss, parts, s.memdlm.per_sample, sync, ctx)

        def backward() -> float:
            (loss * ctx.world_size).backward()  # undo the mean over ranks of DDP / FSDP
            return clip(model, state.phase.grad_clip)

        return StepOutcome(record, backward, int(batch.x0.numel()))

    return one_step


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
    generators: dict[str, torch.Generator]
    counters: dict[str, Any]

    @classmethod
    def start(cls, model, resumed, phase, sampler, seed, folder, ctx, reporter, log):
        """Wrap the model (before the optimizer: FSDP2 replaces its parameters), build the
        optimizer and schedule, and restore `resumed` (or FSDP's sharded checkpoint)."""
        runner = _runner(model, ctx)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=phase.lr, betas=(0.9, 0.999), weight_decay=phase.weight_decay
        )
        factor = cosine_with_warmup(phase.steps, phase.warmup_ratio, phase.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        generators, counters = phase_generators(seed, ctx.device), new_counters()
        if resumed is not None:
            restore(resumed, optimizer, scheduler, sampler, generators, counters)
        elif ctx.strategy == "fsdp" and (folder / DCP_FOLDER).exists():
            restore(
                load_dcp(folder, model, optimizer), None, scheduler, sampler, generators, counters
            )
        if ctx.is_main:  # as the single-process phase: records past the checkpoint are redone
            log.drop_after(counters["step"] - 1)
            ckpt.remove_stale_temporaries(folder)
        if counters["step"]:
            reporter.note(f"resuming {folder} at step {counters['step']} on {ctx.world_size} ranks")
        return cls(
            model, phase, sampler, folder, ctx, runner, optimizer, scheduler, generators, counters
        )

    def run(self, loss_of):
        """`loss_of(model)` through the runner (DDP needs its forward to run the step)."""
        if self.runner is None or self.ctx.strategy == "fsdp":
            return loss_of(self.model)
        return self.runner(loss_of)

    def save(self) -> None:
        extra = resume_payload(
            self.optimizer, self.scheduler, self.sampler, self.generators, self.counters
        )
        if self.ctx.strategy == "fsdp":
            del extra["optimizer"]  # in the sharded part
            save_dcp(self.folder, self.model, self.optimizer, extra, self.ctx)
            return
        if self.ctx.is_main:
            ckpt.save(self.folder / "checkpoint.pt", {"model": self.model.state_dict(), **extra})
        self.ctx.barrier()

    def finish(self, log: MetricsLog) -> PhaseResult:
        """The last checkpoint, `model.pt` (full weights and the result), the result."""
        self.save()
        weights = full_state_dict(self.model, self.ctx)
        result = summarise(log.records(), self.counters) if self.ctx.is_main else None
        result = self.ctx.broadcast(result)
        if self.ctx.is_main:
            ckpt.save(self.folder / "model.pt", {"model": weights, "result": result.__dict__})
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
    model.load_state_dict(state["model"])
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


def phase_options(cfg, data) -> dict[str, Any]:
    """The keyword arguments of `train.train_phase` that follow from the configuration."""
    return {
        "memdlm": cfg.memdlm,
        "mask_id": data.tokenizer.mask_id,
        "time_eps": cfg.time_eps,
        "loss_backend": cfg.loss_backend,
        "compiled": cfg.compile,
    }
