"""`compare`: one base, then Standard and MemDLM fine-tuned from it with paired seeds.

1. The base (`commands.base_model`): `--base CKPT`; a Hugging Face backbone's own weights
   (`model.path`: no pretraining, as in the paper); the cached or shipped base of this
   configuration (`commands.bases`); else pretrain one with the standard objective
   (`--pretrain` forces it).
2. Jobs: the base's evaluation, and for each seed Standard and MemDLM fine-tuned from the base and
   evaluated. Both methods of a seed see the same batches in the same order and the same anchor
   masks (`loop.steps.phase_generators`); every model is scored on the same held-out data and
   anchors. On a CPU the jobs run side by side, one process per core (`loop.workers`); their
   results do not depend on it.
   `variants` (`--variants leak_free,standard_matched`, names in `config.VARIANTS`) add runs
   of other configurations on the same seeds, each with its own paired verdict against Standard
   (summary.json "variants").
3. The table and the verdict, summary.json and plots. The summary is rewritten after every job,
   so results appear as they come out and an interrupted comparison keeps what it finished.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.build import load_weights, new_model, resolve_device
from recipes.memdlm.commands.base_model import fresh_base, obtain_base
from recipes.memdlm.commands.folders import (
    UsageError,
    fresh_folder,
    removed_on_user_error,
    run_config,
    stamp,
)
from recipes.memdlm.commands.runs import (
    METHODS,
    evaluate_run,
    evaluated_once,
    fine_tune,
    run_method,
    write_outputs,
)
from recipes.memdlm.config import Config, variant_config
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.eval.metrics import eval_loss, niah_accuracy
from recipes.memdlm.eval.report import (
    method_summary,
    paired,
    per_seed_record,
    print_report,
)
from recipes.memdlm.eval.suite import loss_set_for
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.progress import JobClock, Reporter
from recipes.memdlm.loop.steps import MetricsLog
from recipes.memdlm.loop.workers import Job, default_workers, run_jobs


def run_compare(
    cfg: Config,
    out: Path,
    *,
    base: Path | None = None,
    cache: Path | None = None,
    pretrain: bool = False,
    workers: int | None = None,
    reporter: Reporter,
) -> dict[str, Any]:
    """The whole comparison into the run folder `out`; returns the summary (summary.json).

    workers: processes side by side (default: one per CPU core, at most one per job; one on an
    accelerator). The results are the same for any number.
    """
    device = resolve_device(cfg.device, cfg.kernels)
    data = prepare_data(cfg)  # every user error surfaces here, before the run folder exists
    model, backbone = fresh_base(cfg, data, base=base, reporter=reporter, device=device)
    jobs = 1 + (len(METHODS) + len(cfg.variants)) * cfg.seeds
    workers = default_workers(device, jobs) if workers is None else workers
    with removed_on_user_error(out):
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / "config.json", cfg.model_dump())
        for name, report in data.reports.items():
            if report.filtered or report.truncated:
                reporter.note(f"{name}: {report.describe(cfg.model.max_seq_len)}")
        clock = JobClock(workers)
        reporter.clock = clock
        try:
            clock.plan("base", "pretrain", cfg.pretrain.steps)
            reporter.current_job = "base"
            _, base_result = obtain_base(
                cfg,
                data,
                out,
                base=base,
                cache=cache,
                reporter=reporter,
                device=device,
                model=model,
                pretrain=pretrain,
            )
            reporter.current_job = None
            clock.finish("base")
            base_file = base if base is not None else _pretrained_file(cfg, out)
            return _fine_tune_all(
                cfg, out, base_file, base_result, backbone, device, workers, clock, reporter
            )
        finally:
            reporter.clock = None
            reporter.current_job = None


def _pretrained_file(cfg: Config, out: Path) -> Path | None:
    return None if cfg.model.path else out / "base" / "model.pt"


def _fine_tune_all(cfg, out, base_file, base_result, backbone, device, workers, clock, reporter):
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    common = {"cfg": cfg, "out": out, "base_file": base_file, "device": str(device)}
    jobs = [Job("base-eval", evaluate_base, common, label="base")]
    clock.plan("base-eval", "base-eval")
    for seed in seeds:
        for run in (*METHODS, *cfg.variants):
            name = f"seed{seed}/{run}"
            method = run_method(cfg, run)[0]
            jobs.append(
                Job(
                    name,
                    fine_tune_and_evaluate,
                    {**common, "seed": seed, "method": run},
                    label=f"seed {seed}",
                )
            )
            clock.plan(name, method, cfg.train.steps)
    if workers > 1:
        reporter.note(f"{len(jobs) - 1} fine-tuning runs on {workers} processes side by side")
    base_eval: dict[str, Any] | None = None
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in (*METHODS, *cfg.variants)}
    summary: dict[str, Any] = {}
    for job, result in run_jobs(jobs, workers=workers, reporter=reporter):
        if job.name == "base-eval":
            base_eval = result
        else:
            records[job.kwargs["method"]].append(result)
            records[job.kwargs["method"]].sort(key=lambda r: r["seed"])
        summary = _summary(cfg, seeds, device, base_result, base_eval, records)
        summary["backbone"] = backbone
        write_outputs(out, summary)  # after every job: results appear as they come out
    print_report(summary, reporter.out)
    print_variants(summary, reporter.out)
    write_outputs(out, summary, merge_metrics(out, seeds, cfg.variants))
    reporter.note(f"run folder: {out}")
    return summary


def _job_data(cfg: Config, base_file: Path | None, device: str):
    """What a job rebuilds for itself: the data, and the base model on `device`."""
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=torch.device(device))
    if base_file is not None:
        load_weights(model, base_file)
    return data, model


def evaluate_base(*, reporter, cfg: Config, out: Path, base_file, device: str) -> dict[str, Any]:
    """The base's held-out loss and needle accuracy, overall and per task (`base/eval.json`;
    a job)."""

    def compute() -> dict[str, Any]:
        data, model = _job_data(cfg, base_file, device)
        accuracy = niah_accuracy(
            model,
            data.accuracy_eval,
            data.tokenizer,
            batch_size=cfg.eval.batch_size,
            device=torch.device(device),
            generate_options=cfg.generate_options(),
            loss_backend=cfg.loss_backend,
        )
        loss_set = loss_set_for(data, cfg, torch.device(device))
        return {
            "eval_loss": eval_loss(model, loss_set, loss_backend=cfg.loss_backend),
            "niah_accuracy": {str(k): v for k, v in accuracy["by_length"].items()},
            "niah_accuracy_by_task": {
                task: {str(k): v for k, v in by_length.items()}
                for task, by_length in accuracy["by_task"].items()
            },
        }

    reporter.note("evaluating the base")
    return evaluated_once(out / "base" / "eval.json", compute)


def fine_tune_and_evaluate(
    *, reporter, cfg: Config, out: Path, base_file, device: str, seed: int, method: str
) -> dict[str, Any]:
    """Fine-tune the base with `method` on `seed`'s batches, evaluate it: the per-seed record
    (`eval.report.per_seed_record`; a job), as `train` does it (`commands.runs`). Its folder is
    out/seed<seed>/<method>, with its own metrics.jsonl (merged into the run's at the end: jobs
    may run side by side).

    method: "standard", "memdlm", or a variant's name (`config.VARIANTS`): its method with its
    configuration, logged under the variant's name."""
    data, model = _job_data(run_method(cfg, method)[1], base_file, device)
    folder = out / f"seed{seed}" / method
    folder.mkdir(parents=True, exist_ok=True)
    result = fine_tune(model, cfg, data, folder, run=method, seed=seed, reporter=reporter)
    reporter.note(f"evaluating seed {seed} {method}")
    evaluation = evaluate_run(model, cfg, data, folder, run=method, device=torch.device(device))
    return per_seed_record(seed, result, evaluation)


def merge_metrics(out: Path, seeds: list[int], variants=()) -> list[dict[str, Any]]:
    """out/metrics.jsonl: the pretraining records, then each run's (seed, method order, then
    the variants in their order).

    Idempotent (a resumed comparison merges again); returns the merged records."""
    path = out / "metrics.jsonl"
    kept = [r for r in MetricsLog(path, {}).records() if r.get("phase") != "train"]
    for seed in seeds:
        for method in (*METHODS, *variants):
            kept += MetricsLog(out / f"seed{seed}" / method / "metrics.jsonl", {}).records()
    text = "".join(json.dumps(r) + "\n" for r in kept)
    ckpt.atomic_write_bytes(path, lambda h: h.write(text.encode()))
    return kept


def _summary(cfg, seeds, device, base_result, base_eval, records) -> dict[str, Any]:
    base = None
    if base_eval is not None or base_result:
        base = {
            **(base_eval or {}),
            **({"seconds_per_step": base_result["seconds_per_step"]} if base_result else {}),
        }
    summary: dict[str, Any] = {
        "schema": "memdlm-compare/1",
        "preset": cfg.preset,
        "seeds": seeds,
        "device": str(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "base": base,
    }
    for method in METHODS:
        summary[method] = method_summary(records[method]) if records[method] else {}
    summary["paired"] = paired(records["standard"], records["memdlm"])
    if cfg.variants:
        summary["variants"] = {}
    for name in cfg.variants:
        method, variant = variant_config(cfg, name)
        entry: dict[str, Any] = {"method": method, "memdlm": variant.memdlm.model_dump()}
        if method == "standard":
            entry["anchors"] = variant.standard_anchors()
        if records[name]:
            entry.update(method_summary(records[name]))
        loss_name = "eval loss (nats)" if method == "standard" else None
        entry["paired"] = paired(
            records["standard"],
            records[name],
            label=name,
            **({"loss_name": loss_name} if loss_name else {}),
        )
        summary["variants"][name] = entry
    return summary


def print_variants(summary: dict[str, Any], console) -> None:
    """One line per compare variant: its paired differences from Standard and the verdicts."""
    for name, entry in (summary.get("variants") or {}).items():
        pair = entry.get("paired") or {}
        if not pair:
            continue
        d_loss, d_acc = pair["eval_loss_delta"], pair["niah_accuracy_delta"]
        console.print(
            f"Variant {name} ({entry['method']}) - Standard over seeds {pair['seeds']}: eval loss "
            f"{d_loss['mean']:+.4f} (sd {d_loss['sd']:.4f}), NIAH exact "
            f"{100 * d_acc['mean']:+.1f} pt (sd {100 * d_acc['sd']:.1f}); a step costs "
            f"{pair['step_time_ratio']['mean']:.2f}x a standard step.",
            markup=False,
            highlight=False,
        )
        for sentence in pair.get("verdict", []):
            console.print(f"Verdict, {sentence}", markup=False, highlight=False)


def cmd_compare(args, extra, reporter) -> int:
    from recipes.memdlm.commands.compare import run_compare

    cfg, out = run_config(args, extra, conflicting=("seeds", "out"), seeds=args.seeds)
    if args.resume is None:
        out = fresh_folder(out or Path("runs") / f"compare-{cfg.preset}-{stamp()}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    cache = None if args.no_cache else args.cache
    run_compare(
        cfg,
        out,
        base=args.base,
        cache=cache,
        pretrain=args.pretrain,
        workers=args.workers,
        reporter=reporter,
    )
    return 0
