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
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import Data
from recipes.memdlm.eval.plots import plot_all
from recipes.memdlm.eval.suite import evaluate_model
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.phase import phase_options, train_phase
from recipes.memdlm.loop.steps import MetricsLog, denormals_flushed

METHODS = ("standard", "memdlm")


def run_method(cfg: Config, run: str) -> tuple[str, Config]:
    """The method and configuration of a run: "standard", "memdlm", or a compare variant's
    name (`config.VARIANTS`), which is one of them with its own settings."""
    return (run, cfg) if run in METHODS else variant_config(cfg, run)


def fine_tune(
    model, cfg: Config, data: Data, folder: Path, *, run: str, seed: int, reporter, ctx=None
):
    """Train `model` with `run` on seed's batches of the fine-tuning data (`loop.train_phase`),
    checkpointing into `folder` and logging to folder/metrics.jsonl under the run's name.
    ctx: the torchrun context (None in one process). Returns the `PhaseResult`."""
    method, cfg = run_method(cfg, run)
    sampler = BatchSampler(
        data.train, cfg.train.batch_size, seed=seed, eos_id=data.tokenizer.eos_id
    )
    log = MetricsLog(folder / "metrics.jsonl", {"phase": "train", "method": run, "seed": seed})
    settings = phase_options(cfg, data)
    if ctx is not None:
        settings.update(ctx=ctx, sync_inner=cfg.distributed.sync_inner)
    return train_phase(
        model,
        method=method,
        phase=cfg.train,
        sampler=sampler,
        seed=seed,
        folder=folder,
        log=log,
        reporter=reporter,
        anchors=cfg.standard_anchors() if method == "standard" else 1,
        **settings,
    )


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
