"""`compare`: one base, then Standard and MemDLM fine-tuned from it with paired seeds.

1. Pretrain a base with the standard objective, or reuse one (`--base CKPT`, or the cache). A
   Hugging Face backbone (`model.path`) is its own base: its pretrained weights, no pretraining.
2. For each seed: fine-tune a copy of the base with Standard and with MemDLM. Both runs see the
   same batches in the same order and the same anchor masks (see `train.phase_generators`).
3. Evaluate every model on the same held-out data and anchors, print the table, write
   summary.json and plots. The summary is rewritten after every run, so results appear as they
   come out and an interrupted comparison keeps what it finished.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.backbones.load import announce, load_weights, new_model, resolve_device
from recipes.memdlm.commands.folders import (
    UsageError,
    config_from_args,
    fresh_folder,
    removed_on_user_error,
    resumed_config,
    stamp,
)
from recipes.memdlm.config import Config
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import Data, prepare_data
from recipes.memdlm.eval.metrics import eval_loss, niah_accuracy
from recipes.memdlm.eval.report import (
    method_summary,
    paired,
    per_seed_record,
    plot_all,
    print_report,
)
from recipes.memdlm.eval.suite import evaluate_model, loss_set_for
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.phase import phase_options, train_phase
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.loop.steps import MetricsLog

METHODS = ("standard", "memdlm")


def base_key(cfg: Config) -> str:
    """Identity of a pretrained base: everything that shapes its weights."""
    payload = {
        "model": cfg.model.model_dump(),
        "data": cfg.data.model_dump(),
        "pretrain": cfg.pretrain.model_dump(),
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def obtain_base(
    cfg: Config,
    data: Data,
    out: Path,
    *,
    base: Path | None,
    cache: Path | None,
    reporter,
    device,
    model: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The pretrained base model and its training result (None when given by the user).

    model: the run's freshly built model (`new_model`, seed cfg.seed), with the weights of `base`
    already loaded when `base` is given (see `fresh_base`); built here when None.
    """
    if model is None:
        model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=device)
        if base is not None:
            load_weights(model, base)
    if base is not None:
        reporter.note(f"base model from {base}")
        return model, None
    if cfg.model.path:  # a pretrained Hugging Face backbone is the base, as in the paper
        reporter.note(f"base model: the pretrained weights in {cfg.model.path}")
        return model, None
    folder = out / "base"
    cached = cache / f"base-{base_key(cfg)}.pt" if cache is not None else None
    if cached is not None and cached.is_file() and not (folder / "model.pt").exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, folder / "model.pt")
        reporter.note(f"reusing the cached base {cached}")
    log = MetricsLog(
        out / "metrics.jsonl", {"phase": "pretrain", "method": "standard", "seed": cfg.seed}
    )
    sampler = BatchSampler(
        data.pretrain, cfg.pretrain.batch_size, seed=cfg.seed, eos_id=data.tokenizer.eos_id
    )
    result = train_phase(
        model,
        method="standard",
        phase=cfg.pretrain,
        sampler=sampler,
        seed=cfg.seed,
        folder=folder,
        log=log,
        reporter=reporter,
        **phase_options(cfg, data),
    )
    if cached is not None and not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(cached, lambda h: h.write((folder / "model.pt").read_bytes()))
    return model, result.__dict__


def fresh_base(
    cfg: Config, data: Data, *, base: Path | None, reporter, device
) -> tuple[torch.nn.Module, dict]:
    """The run's model before the run folder is written, so that what only the model can tell
    (a base checkpoint that is corrupt or does not fit, fast-weight targets that match no module)
    fails first: the model (with `base`'s weights when given) and its `announce` record."""
    if base is not None and base.is_dir():
        raise FileNotFoundError(f"base checkpoint {str(base)!r} is a folder; give its model.pt")
    if base is not None and not base.is_file():
        raise FileNotFoundError(f"base checkpoint {str(base)!r} does not exist")
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=device)
    backbone = announce(model, cfg, reporter)
    if base is not None:
        load_weights(model, base)
    return model, backbone


def _cached_eval(folder: Path, compute) -> dict[str, Any]:
    path = folder / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    ckpt.write_json(path, result)
    return json.loads(path.read_text())  # JSON round trip: the same types as when reused


def run_compare(
    cfg: Config,
    out: Path,
    *,
    base: Path | None = None,
    cache: Path | None = None,
    reporter: Reporter,
) -> dict[str, Any]:
    device = resolve_device(cfg.device, cfg.kernels)
    data = prepare_data(cfg)  # every user error surfaces here, before the run folder exists
    model, backbone = fresh_base(cfg, data, base=base, reporter=reporter, device=device)
    with removed_on_user_error(out):
        return _compare(cfg, data, out, model, backbone, base, cache, reporter, device)


def _compare(cfg, data, out, model, backbone, base, cache, reporter, device) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "config.json", cfg.model_dump())
    for name, report in data.reports.items():
        if report.filtered or report.truncated:
            reporter.note(f"{name}: {report.describe(cfg.model.max_seq_len)}")

    base_model, base_result = obtain_base(
        cfg, data, out, base=base, cache=cache, reporter=reporter, device=device, model=model
    )
    loss_set = loss_set_for(data, cfg, device)
    base_eval = _cached_eval(
        out / "base",
        lambda: {
            "eval_loss": eval_loss(base_model, loss_set, loss_backend=cfg.loss_backend),
            "niah_accuracy": {
                str(k): v
                for k, v in niah_accuracy(
                    base_model,
                    data.accuracy_eval,
                    data.tokenizer,
                    batch_size=cfg.eval.batch_size,
                    device=device,
                    generate_options=cfg.generate_options(),
                    loss_backend=cfg.loss_backend,
                )["by_length"].items()
            },
        },
    )
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    summary: dict[str, Any] = {}
    for seed in seeds:
        for method in METHODS:
            folder = out / f"seed{seed}" / method
            model = copy.deepcopy(base_model)
            log = MetricsLog(
                out / "metrics.jsonl", {"phase": "train", "method": method, "seed": seed}
            )
            sampler = BatchSampler(
                data.train, cfg.train.batch_size, seed=seed, eos_id=data.tokenizer.eos_id
            )
            result = train_phase(
                model,
                method=method,
                phase=cfg.train,
                sampler=sampler,
                seed=seed,
                folder=folder,
                log=log,
                reporter=reporter,
                **phase_options(cfg, data),
            )
            reporter.note(f"evaluating seed {seed} {method}")
            evaluation = _cached_eval(
                folder,
                lambda m=model, meth=method: evaluate_model(
                    m, data, cfg, method=meth, device=device, loss_set=loss_set
                ),
            )
            records[method].append(per_seed_record(seed, result, evaluation))
            summary = _summary(cfg, seeds, device, base_result, base_eval, records)
            summary["backbone"] = backbone
            ckpt.write_json(out / "summary.json", summary)
    print_report(summary, reporter.out)
    metrics = MetricsLog(out / "metrics.jsonl", {}).records()
    plot_all(summary, metrics, out / "plots")
    reporter.note(f"run folder: {out}")
    return summary


def _summary(cfg, seeds, device, base_result, base_eval, records) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "schema": "memdlm-compare/1",
        "preset": cfg.preset,
        "seeds": seeds,
        "device": str(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "base": {
            **base_eval,
            **({"seconds_per_step": base_result["seconds_per_step"]} if base_result else {}),
        },
    }
    for method in METHODS:
        summary[method] = method_summary(records[method]) if records[method] else {}
    summary["paired"] = paired(records["standard"], records["memdlm"])
    if not summary["memdlm"]:
        summary["memdlm"] = {}
    return summary


def cmd_compare(args, extra, reporter) -> int:
    from recipes.memdlm.commands.compare import run_compare

    if args.resume is not None:
        if extra or args.seeds or args.out or args.config:
            raise UsageError("--resume takes the saved configuration; drop other options")
        cfg, out = resumed_config(args.resume), args.resume
    else:
        cfg = config_from_args(args, extra, seeds=args.seeds)
        out = fresh_folder(args.out or Path("runs") / f"compare-{cfg.preset}-{stamp()}")
    cache = None if args.no_cache else args.cache
    run_compare(cfg, out, base=args.base, cache=cache, reporter=reporter)
    return 0
