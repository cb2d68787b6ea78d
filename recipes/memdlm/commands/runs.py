"""One fine-tuning run, as `train` does it and as every `compare` job does it.

    fine_tune        the method's training phase into the run's folder (checkpoints, metrics)
    evaluate_run     the evaluation suite, kept in the folder's eval.json (a resumed run
                     does not evaluate twice)
    write_outputs    summary.json, and the plots from the run's metrics

`train` is one run in its own folder; `compare` runs one per seed and method in
out/seed<seed>/<run> and writes one summary for all of them. The folder and `--resume` rules
are `commands.folders`'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.config import Config, variant_config
from recipes.memdlm.data.prepare import Data
from recipes.memdlm.eval.metrics import eval_loss
from recipes.memdlm.eval.plots import plot_all
from recipes.memdlm.eval.suite import evaluate_model, loss_set_for
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop import tensorboard
from recipes.memdlm.loop.periodic import PeriodicEval
from recipes.memdlm.loop.phase import phase_options, train_phase
from recipes.memdlm.loop.plan import plan_phase, resolved, sampler_for
from recipes.memdlm.loop.steps import MetricsLog, denormals_flushed

METHODS = ("standard", "memdlm")


def run_method(cfg: Config, run: str) -> tuple[str, Config]:
    """The method and configuration of a run: "standard", "memdlm", or a compare variant's
    name (`config.VARIANTS`), which is one of them with its own settings."""
    return (run, cfg) if run in METHODS else variant_config(cfg, run)


def phase_log(where: Path, folder: Path, phase, name: str, method: str, seed: int) -> MetricsLog:
    """The phase's log `where`/metrics.jsonl (records tagged with the phase `name`, `method` and
    `seed`), also as TensorBoard events in `folder`/tensorboard when `phase.tensorboard`."""
    log = MetricsLog(where / "metrics.jsonl", {"phase": name, "method": method, "seed": seed})
    tensorboard.attach(log, phase.tensorboard, folder)
    return log


def fine_tune(
    model, cfg: Config, data: Data, folder: Path, *, run: str, seed: int, reporter, ctx=None
):
    """Train `model` with `run` on seed's batches of the fine-tuning data (`loop.train_phase`),
    checkpointing into `folder` and logging to folder/metrics.jsonl under the run's name.
    ctx: the torchrun context (None in one process). Returns the `PhaseResult`."""
    method, cfg = run_method(cfg, run)
    plan = plan_phase(cfg.train, len(data.train), 1 if ctx is None else ctx.world_size)
    reporter.note(plan.describe())
    sampler = sampler_for(cfg.train, plan, data.train, seed=seed, eos_id=data.tokenizer.eos_id)
    log = phase_log(folder, folder, cfg.train, "train", run, seed)
    anchors = cfg.standard_anchors() if method == "standard" else 1
    sync = ctx is not None and cfg.distributed.sync_inner
    settings = phase_options(cfg, data, method, anchors=anchors, sync_inner=sync)
    evaluate = None
    if plan.eval_every is not None:
        evaluate = PeriodicEval(plan.eval_every, held_out_metrics(cfg, data, method))
    return train_phase(
        model,
        settings,
        phase=resolved(cfg.train, plan),
        evaluate=evaluate,
        sampler=sampler,
        seed=seed,
        folder=folder,
        log=log,
        reporter=reporter,
        ctx=ctx,
    )


def held_out_metrics(cfg: Config, data: Data, method: str):
    """`metrics(model, mem)` for the periodic evaluation during training: the held-out loss
    with fast weights off (the Train-Only loss), and for MemDLM also after adapting to each
    batch's answers (the loss the authors' trainer reports at its evaluations)."""
    cache: dict[str, Any] = {}

    def metrics(model, mem) -> dict[str, float]:
        device = next(model.parameters()).device
        if "set" not in cache:
            cache["set"] = loss_set_for(data, cfg, device)
        backend = {"loss_backend": cfg.loss_backend}
        result = {"eval_loss": eval_loss(model, cache["set"], **backend)}
        if method == "memdlm" and mem is not None:
            result["eval_loss_answer_adapted"] = eval_loss(
                model, cache["set"], mode="adapted", mem=mem, cfg=cfg.memdlm,
                mask_id=data.tokenizer.mask_id, **backend,
            )  # fmt: skip
        return result

    return metrics


def evaluate_run(
    model, cfg: Config, data: Data, folder: Path, *, run: str, device: torch.device
) -> dict[str, Any]:
    """`eval.suite.evaluate_model` of a trained run, computed once: folder/eval.json holds it,
    and a resumed run that finds it reads it back (the same JSON types either way)."""
    method, cfg = run_method(cfg, run)
    return evaluated_once(
        folder / "eval.json",
        lambda: evaluate_model(model, data, cfg, method=method, device=device),
    )


def evaluated_once(path: Path, compute) -> dict[str, Any]:
    """`compute()` (an evaluation) kept in the JSON file `path`: read back when it exists.
    The value goes through JSON either way, so a resumed run sees the same types."""
    if not path.is_file():
        with denormals_flushed():  # as every evaluation (`loop.steps.denormals_flushed`)
            result = compute()
        ckpt.write_json(path, result)
    return json.loads(path.read_text())


def write_outputs(
    out: Path, summary: dict[str, Any], metrics: list[dict[str, Any]] | None = None
) -> None:
    """out/summary.json; with `metrics` (the run's records), also the plots in out/plots."""
    ckpt.write_json(out / "summary.json", summary)
    if metrics is not None:
        plot_all(summary, metrics, out / "plots")
