"""The training phase, one process or torchrun: one phase = one folder with its checkpoints.

A phase folder holds `checkpoint.pt` (model, optimizer, scheduler, data position, generator
and RNG states; written atomically every `ckpt_every` steps, on Ctrl-C and at the end) and,
once finished, `model.pt`. Starting a phase whose folder has `model.pt` reuses it; one with only
`checkpoint.pt` resumes from it, and the losses after resuming equal an uninterrupted run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.memdlm.config import MemDLMConfig, PhaseConfig
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.parallel import (
    Context,
    StepModule,
    clip,
    draw_global,
    inner_grad_sync,
    local_step,
    reduce_metrics,
    sync_shares,
    take_rows,
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
    make_fast_weights,
)


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
    anchors: int = 1,
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
    inner gradients of shared fast weights across ranks. anchors: Standard only, independent
    anchors per batch, the loss averaged over them (the compute-matched control,
    `Config.standard_anchors`). Returns the result on every rank.
    """
    if anchors < 1 or (anchors > 1 and method != "standard"):
        raise ValueError(f"anchors={anchors}: more than one anchor per batch is for Standard")
    if ctx is None:
        ctx = Context.single(next(model.parameters()).device)
    if sync_inner and memdlm.per_sample and method == "memdlm":
        raise UserError(
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
        raise UserError(
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
            anchors=anchors,
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
        with denormals_flushed():
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


def phase_options(cfg, data) -> dict[str, Any]:
    """The keyword arguments of `train.train_phase` that follow from the configuration."""
    return {
        "memdlm": cfg.memdlm,
        "mask_id": data.tokenizer.mask_id,
        "time_eps": cfg.time_eps,
        "loss_backend": cfg.loss_backend,
        "compiled": cfg.compile,
    }
