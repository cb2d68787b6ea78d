"""`inner-lr`: choose the inner learning rate from the same-batch gap it produces.

At small scale the paper's inner lr 0.1 can leave the loss unchanged (memdlm-method.md section 8),
while a strong inner loop makes the base model depend on the fast weights (section 9). This scan
measures, on the pretrained base and a few fine-tuning batches with fixed anchors, the gap
`loss(fast weights off) - loss(after the inner loop)` for each candidate lr, and recommends the
largest lr whose mean gap stays at or below a target (default 0.05 nats).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from recipes.memdlm.backbones import adapter
from recipes.memdlm.build import resolve_device
from recipes.memdlm.commands.base_model import fresh_base, obtain_base
from recipes.memdlm.commands.folders import (
    UsageError,
    config_from_args,
    fresh_folder,
    removed_on_user_error,
    stamp,
)
from recipes.memdlm.config import Config
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.eval.metrics import EVAL_SEED
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.method import MemDLM, record_of, sample_anchor


def probe_gaps(
    model, batches, anchors, cfg, *, mask_id: int, loss_backend: str | None = "auto"
) -> dict[str, float]:
    """Mean same-batch gap and inner gradient norm of one inner-loop configuration."""
    backbone = adapter(model)
    method = MemDLM.on(backbone, cfg, mask_id=mask_id, loss_backend=loss_backend)
    generator = torch.Generator(device=batches[0].x0.device).manual_seed(EVAL_SEED + 4)
    gaps, norms = [], []
    try:
        for batch, anchor in zip(batches, anchors):
            draws = method.draw_after(batch, anchor, generator)
            with torch.no_grad():
                metrics = record_of(*method.loss(backbone, draws, log_gap=True))
            gaps.append(metrics["gap"])
            norms.append(max(v for k, v in metrics.items() if k.startswith("inner_grad_norm")))
    finally:
        method.close()
    return {
        "gap": statistics.fmean(gaps),
        "gap_sd": statistics.pstdev(gaps),
        "inner_grad_norm": statistics.fmean(norms),
    }


def run_scan(
    cfg: Config,
    out: Path,
    lrs: list[float],
    *,
    target_gap: float,
    n_batches: int,
    base: Path | None,
    cache: Path | None,
    reporter: Reporter,
) -> dict[str, Any]:
    device = resolve_device(cfg.device, cfg.kernels)
    data = prepare_data(cfg)
    model, _ = fresh_base(cfg, data, base=base, reporter=reporter, device=device)
    with removed_on_user_error(out):
        return _scan(
            cfg, data, out, model, lrs, target_gap, n_batches, base, cache, reporter, device
        )


def _scan(cfg, data, out, model, lrs, target_gap, n_batches, base, cache, reporter, device):
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "config.json", cfg.model_dump())
    model, _ = obtain_base(
        cfg, data, out, base=base, cache=cache, reporter=reporter, device=device, model=model
    )
    model.eval()
    sampler = BatchSampler(
        data.train, cfg.train.batch_size, seed=cfg.seed, eos_id=data.tokenizer.eos_id
    )
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    batches = [sampler.next().to(device) for _ in range(n_batches)]
    anchors = [
        sample_anchor(b, mask_id=data.tokenizer.mask_id, eps=cfg.time_eps, generator=generator)
        for b in batches
    ]
    rows = []
    for lr in lrs:
        inner = cfg.memdlm.model_copy(update={"inner_lr": lr})
        stats = probe_gaps(
            model,
            batches,
            anchors,
            inner,
            mask_id=data.tokenizer.mask_id,
            loss_backend=cfg.loss_backend,
        )
        rows.append({"inner_lr": lr, **stats})
        reporter.note(f"inner lr {lr:g}: gap {stats['gap']:+.5f} nats")
    eligible = [r["inner_lr"] for r in rows if 0 < r["gap"] <= target_gap]
    result = {
        "grad_transform": cfg.memdlm.grad_transform,
        "per_sample": cfg.memdlm.per_sample,
        "target_gap": target_gap,
        "rows": rows,
        "recommended_inner_lr": max(eligible) if eligible else None,
    }
    ckpt.write_json(out / "scan.json", result)
    table = Table(title=f"Inner-lr scan ({cfg.memdlm.grad_transform}, {n_batches} batches)")
    for column in ("inner lr", "same-batch gap (nats)", "sd", "inner grad norm"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r['inner_lr']:g}",
            f"{r['gap']:+.5f}",
            f"{r['gap_sd']:.5f}",
            f"{r['inner_grad_norm']:.4f}",
        )
    reporter.out.print(table)
    choice = result["recommended_inner_lr"]
    reporter.out.print(
        f"recommended inner lr (largest with 0 < gap <= {target_gap}): {choice}"
        if choice is not None
        else f"no candidate gives 0 < gap <= {target_gap}"
    )
    return result


def cmd_inner_lr(args, extra, reporter) -> int:
    from recipes.memdlm.commands.inner_lr import run_scan

    cfg = config_from_args(args, extra)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
    if not lrs or any(not math.isfinite(lr) or lr < 0 for lr in lrs):
        raise UsageError(f"--lrs needs finite non-negative numbers, got {args.lrs!r}")
    if not math.isfinite(args.target_gap) or args.target_gap <= 0:
        raise UsageError(f"--target-gap must be a positive number of nats, got {args.target_gap}")
    if args.batches < 1:
        raise UsageError(f"--batches must be at least 1, got {args.batches}")
    out = fresh_folder(args.out or Path("runs") / f"inner-lr-{cfg.preset}-{stamp()}")
    run_scan(
        cfg,
        out,
        lrs,
        target_gap=args.target_gap,
        n_batches=args.batches,
        base=args.base,
        cache=args.cache,
        reporter=reporter,
    )
    return 0
