"""`python -m recipes.memdlm train`: one method on the fine-tuning data, then its evaluation."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from recipes.memdlm.commands.folders import (
    checkpoint_file,
    fresh_folder,
    removed_on_user_error,
    run_config,
    stamp,
)

TRAIN_OPTIONS = ("method", "out", "base")  # what `--resume` does not take


def cmd_train(args, extra, reporter) -> int:
    from recipes.memdlm.build import announce, load_weights, new_model, resolve_device
    from recipes.memdlm.data.prepare import prepare_data
    from recipes.memdlm.loop import checkpoint as ckpt
    from recipes.memdlm.loop import parallel as distributed

    if distributed.launched():  # under torchrun: one process per device (docs/scaling.md)
        return train_distributed(args, extra, reporter)
    cfg, out = run_config(args, extra, conflicting=TRAIN_OPTIONS, method=args.method)
    if args.resume is None:
        out = fresh_folder(out or Path("runs") / f"train-{cfg.method}-{stamp()}")
        if args.base is not None:
            ckpt.check(checkpoint_file(args.base))
    if args.resume is not None and (out / "checkpoint.pt").is_file():
        ckpt.check(out / "checkpoint.pt")  # a corrupt one fails before the backbone line
    device = resolve_device(cfg.device, cfg.kernels)
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=device)
    backbone = announce(model, cfg, reporter)  # fast-weight targets that match nothing fail here
    if args.resume is None and args.base is not None:
        load_weights(model, checkpoint_file(args.base))
    with removed_on_user_error(out):
        return _train(model, backbone, cfg, data, out, args, reporter, device)


def _train(model, backbone, cfg, data, out: Path, args, reporter, device) -> int:
    from recipes.memdlm.commands.estimate import note_at_start
    from recipes.memdlm.commands.runs import evaluate_run, fine_tune
    from recipes.memdlm.loop import checkpoint as ckpt

    out.mkdir(parents=True, exist_ok=True)
    if args.resume is None:
        ckpt.write_json(out / "config.json", cfg.model_dump())
    note_at_start(cfg, data, 1, reporter)  # memory and disk (commands/estimate.py)
    result = fine_tune(model, cfg, data, out, run=cfg.method, seed=cfg.seed, reporter=reporter)
    evaluation = evaluate_run(model, cfg, data, out, run=cfg.method, device=device)
    _write_summary(out, cfg, result, evaluation, backbone, reporter)
    return 0


def _write_summary(out, cfg, result, evaluation, backbone, reporter, distributed=None) -> None:
    """summary.json and plots/ of a finished `train` run (`runs.write_outputs`), and its
    one-line result (`distributed`: the {world_size, strategy} of a torchrun job)."""
    from recipes.memdlm.commands.runs import write_outputs
    from recipes.memdlm.eval.report import per_seed_record
    from recipes.memdlm.loop.steps import MetricsLog

    summary = {cfg.method: per_seed_record(cfg.seed, result, evaluation)}
    if distributed is not None:
        summary["distributed"] = distributed
    summary["backbone"] = backbone
    write_outputs(out, summary, MetricsLog(out / "metrics.jsonl", {}).records())
    record = summary[cfg.method]
    where = (
        f" on {distributed['world_size']} ranks"
        if distributed is not None
        else f", NIAH {record['niah_accuracy']}"
    )
    reporter.out.print(
        f"{cfg.method}: train loss {record['train_loss_final']:.4f}, eval loss "
        f"{record['eval_loss']:.4f}{where}; run folder {out}"
    )


def train_distributed(args, extra: list[str], reporter) -> int:
    """`python -m recipes.memdlm train` under torchrun (called by `cmd_train`).

    Every rank builds the configuration, data and model; rank 0 writes the run folder. After
    training, DDP ranks other than 0 stop and rank 0 evaluates the plain model; FSDP ranks
    evaluate together (the weights are sharded) and rank 0 writes the summary.
    """
    import torch.distributed as dist

    from recipes.memdlm.build import announce, load_weights, new_model
    from recipes.memdlm.commands.estimate import note_at_start
    from recipes.memdlm.commands.runs import fine_tune
    from recipes.memdlm.data.prepare import prepare_data
    from recipes.memdlm.eval.suite import evaluate_model
    from recipes.memdlm.loop import checkpoint as ckpt
    from recipes.memdlm.loop.parallel import broadcast, init, shutdown
    from recipes.memdlm.loop.progress import Reporter

    cfg, out = run_config(args, extra, conflicting=TRAIN_OPTIONS, method=args.method)
    ctx = init(cfg.distributed, cfg.device)
    try:
        if out is None:  # one time stamp for every rank
            out = broadcast(Path("runs") / f"train-{cfg.method}-{stamp()}")
        # Rank 0 writes the folder, so it alone removes it again on a user error.
        with removed_on_user_error(out) if ctx.is_main else nullcontext():
            if args.resume is None:
                fresh_folder(out)
                if args.base is not None:
                    checkpoint_file(args.base)
            dist.barrier()  # every rank has checked the folder before rank 0 writes into it
            if not ctx.is_main:
                reporter = Reporter(quiet=True)
            data = prepare_data(cfg)
            model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=ctx.device)
            backbone = announce(model, cfg, reporter)
            if args.resume is None and args.base is not None:
                load_weights(model, checkpoint_file(args.base))
            if ctx.is_main:
                out.mkdir(parents=True, exist_ok=True)
                if args.resume is None:
                    ckpt.write_json(out / "config.json", cfg.model_dump())
            dist.barrier()
            note_at_start(cfg, data, ctx.world_size, reporter)
            result = fine_tune(  # the one-process run's settings (compile included)
                model, cfg, data, out, run=cfg.method, seed=cfg.seed, reporter=reporter, ctx=ctx
            )
            if ctx.strategy == "ddp" and not ctx.is_main:
                return 0
            # FSDP ranks evaluate together (no eval.json cache: the weights are sharded).
            evaluation = evaluate_model(model, data, cfg, method=cfg.method, device=ctx.device)
            if ctx.is_main:
                distributed = {"world_size": ctx.world_size, "strategy": ctx.strategy}
                _write_summary(out, cfg, result, evaluation, backbone, reporter, distributed)
            return 0
    finally:
        shutdown()
