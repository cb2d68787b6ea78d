"""Command line of the MemDLM recipe: `python -m recipes.memdlm [command] [options]`.

With no command it runs `compare` on the default preset. Any `--section.key value` option
that is not one of a command's own flags overrides the configuration (see config.py).
User errors print one line and exit with code 2; a stopped training run exits with 1;
Ctrl-C checkpoints and exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from recipes.memdlm.config import (
    PRESETS,
    Config,
    ConfigError,
    build_config,
    deep_merge,
    parse_overrides,
)

COMMANDS = ("train", "eval", "sample", "compare", "inner-lr")
CHECKPOINT_HELP = (
    "model.pt, or a run folder holding one; may be left out with --model PATH, "
    "which then uses the Hugging Face model's own weights"
)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="cpu-tiny",
        choices=sorted(PRESETS),
        help="configuration preset (default: cpu-tiny)",
    )
    parser.add_argument("--config", type=Path, help="TOML file overriding the preset")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.memdlm",
        description="Train, evaluate and compare MemDLM against the standard MDLM baseline. "
        "With no command, runs `compare` on the default preset. Options of the form "
        "--section.key VALUE override the configuration (e.g. --train.steps 100); "
        "--model PATH (short for --model.path) uses a local Hugging Face model.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser(
        "compare",
        allow_abbrev=False,
        help="pretrain a base, fine-tune Standard and MemDLM from it, compare (default)",
        description="Pretrain (or reuse) a base with the standard objective, "
        "fine-tune copies with Standard and MemDLM on paired seeds, evaluate, print "
        "a table and write a run folder.",
    )
    _add_config_options(p)
    p.add_argument("--out", type=Path, help="run folder (default: runs/compare-<preset>-<time>)")
    p.add_argument("--seeds", type=int, help="number of paired seeds (mean and spread)")
    p.add_argument("--base", type=Path, help="pretrained base checkpoint (model.pt) to reuse")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("runs/cache"),
        help="where pretrained bases are cached (default: runs/cache)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the comparison in DIR")

    p = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train one method",
        description="Train one method from scratch or from --base.",
    )
    _add_config_options(p)
    p.add_argument("--method", choices=("standard", "memdlm"), help="objective (default memdlm)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/train-<method>-<time>)")
    p.add_argument("--base", type=Path, help="start from this checkpoint (model.pt)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")

    p = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="evaluate a checkpoint",
        description="Held-out loss, needle accuracy and the exposure-bias ratio "
        "of a checkpoint; with --method memdlm also the adapted variants.",
    )
    _add_config_options(p)
    p.add_argument("checkpoint", type=Path, nargs="?", help=CHECKPOINT_HELP)
    p.add_argument("--method", choices=("standard", "memdlm"), default="standard")

    p = sub.add_parser(
        "sample",
        allow_abbrev=False,
        help="generate text from a prompt",
        description="Prompt in, text out, optionally with inference-time "
        "adaptation of fast weights on the prompt.",
    )
    _add_config_options(p)
    p.add_argument("checkpoint", type=Path, nargs="?", help=CHECKPOINT_HELP)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--adapt", action="store_true", help="adapt fast weights on the prompt first")
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--steps", type=int, help="denoising steps (default: gen-length)")
    p.add_argument("--block-length", type=int, help="semi-autoregressive block length")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--remasking",
        default="low_confidence",
        choices=("low_confidence", "random", "margin", "entropy"),
    )
    p.add_argument("--threshold", type=float, help="parallel decoding confidence threshold")
    p.add_argument("--seed", type=int, default=0, dest="sample_seed")

    p = sub.add_parser(
        "inner-lr",
        allow_abbrev=False,
        help="scan the inner learning rate",
        description="Measure the same-batch gap per inner lr on the base model and "
        "recommend the largest lr whose gap stays at or below a target.",
    )
    _add_config_options(p)
    p.add_argument("--lrs", default="0.01,0.03,0.1,0.3,1,3", help="comma-separated candidates")
    p.add_argument("--target-gap", type=float, default=0.05, help="nats (default 0.05)")
    p.add_argument("--batches", type=int, default=8, help="probe batches (default 8)")
    p.add_argument("--out", type=Path, help="folder (default: runs/inner-lr-<preset>-<time>)")
    p.add_argument("--base", type=Path, help="pretrained base checkpoint (model.pt)")
    p.add_argument("--cache", type=Path, default=Path("runs/cache"))
    return parser


class UsageError(ValueError):
    """A command-line mistake reported in one line with exit code 2."""


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _fresh_folder(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"run folder {str(path)!r} exists and is not empty; use --resume or --out")
    return path


def _config(args, extra: list[str], **fixed) -> Config:
    overrides = parse_overrides(extra)
    for key, value in fixed.items():
        if value is not None:
            overrides[key] = value
    return build_config(args.preset, args.config, overrides)


def _resumed_config(folder: Path) -> Config:
    path = folder / "config.json"
    if not path.is_file():
        raise UsageError(f"cannot resume: {str(path)!r} does not exist")
    try:
        return Config.model_validate_json(path.read_text())
    except ValueError as error:
        raise UsageError(f"cannot resume: {path} is not a valid config ({error})") from None


def _checkpoint_file(path: Path) -> Path:
    candidate = path / "model.pt" if path.is_dir() else path
    if not candidate.is_file():
        raise UsageError(f"checkpoint {str(path)!r} not found (expected model.pt)")
    return candidate


def _checkpoint_config(args, extra, checkpoint: Path) -> Config:
    """The config saved beside a checkpoint (its run folder), else the preset, plus overrides."""
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        saved = folder / "config.json"
        if saved.is_file() and args.config is None:
            base = Config.model_validate_json(saved.read_text()).model_dump()
            merged = deep_merge(base, parse_overrides(extra))
            try:
                return Config.model_validate(merged)
            except ValueError as error:
                raise ConfigError(str(error).splitlines()[0]) from None
    return _config(args, extra)


def cmd_compare(args, extra, reporter) -> int:
    from recipes.memdlm.commands.compare import run_compare

    if args.resume is not None:
        if extra or args.seeds or args.out or args.config:
            raise UsageError("--resume takes the saved configuration; drop other options")
        cfg, out = _resumed_config(args.resume), args.resume
    else:
        cfg = _config(args, extra, seeds=args.seeds)
        out = _fresh_folder(args.out or Path("runs") / f"compare-{cfg.preset}-{_stamp()}")
    cache = None if args.no_cache else args.cache
    run_compare(cfg, out, base=args.base, cache=cache, reporter=reporter)
    return 0


def cmd_train(args, extra, reporter) -> int:
    from recipes.memdlm.data.tasks.batches import BatchSampler
    from recipes.memdlm.data.tasks.prepare import (
        evaluate_model,
        load_weights,
        new_model,
        phase_options,
        prepare_data,
        resolve_device,
    )
    from recipes.memdlm.eval.report import per_seed_record
    from recipes.memdlm.loop import checkpoint as ckpt
    from recipes.memdlm.loop import parallel as distributed
    from recipes.memdlm.loop.phase import MetricsLog, train_phase

    if distributed.launched():  # under torchrun: one process per device (docs/scaling.md)
        return distributed.cmd_train(args, extra, reporter)
    if args.resume is not None:
        if extra or args.method or args.out or args.config or args.base:
            raise UsageError("--resume takes the saved configuration; drop other options")
        cfg, out = _resumed_config(args.resume), args.resume
    else:
        cfg = _config(args, extra, method=args.method)
        out = _fresh_folder(args.out or Path("runs") / f"train-{cfg.method}-{_stamp()}")
        if args.base is not None:
            _checkpoint_file(args.base)
    device = resolve_device(cfg.device)
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=device)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume is None:
        ckpt.write_json(out / "config.json", cfg.model_dump())
        if args.base is not None:
            load_weights(model, _checkpoint_file(args.base))
    sampler = BatchSampler(
        data.train, cfg.train.batch_size, seed=cfg.seed, eos_id=data.tokenizer.eos_id
    )
    log = MetricsLog(
        out / "metrics.jsonl", {"phase": "train", "method": cfg.method, "seed": cfg.seed}
    )
    result = train_phase(
        model,
        method=cfg.method,
        phase=cfg.train,
        sampler=sampler,
        seed=cfg.seed,
        folder=out,
        log=log,
        reporter=reporter,
        **phase_options(cfg, data),
    )
    evaluation = evaluate_model(model, data, cfg, method=cfg.method, device=device)
    summary = {cfg.method: per_seed_record(cfg.seed, result, evaluation)}
    ckpt.write_json(out / "summary.json", summary)
    record = summary[cfg.method]
    reporter.out.print(
        f"{cfg.method}: train loss {record['train_loss_final']:.4f}, eval loss "
        f"{record['eval_loss']:.4f}, NIAH {record['niah_accuracy']}; run folder {out}"
    )
    return 0


def _load_model(args, extra):
    from recipes.memdlm.data.tasks.prepare import load_weights, new_model, resolve_device, tokenizer_for

    if args.checkpoint is None:  # a pretrained Hugging Face model as it is
        cfg = _config(args, extra)
        if not cfg.model.path:
            raise UsageError("give a checkpoint (model.pt or a run folder), or --model PATH")
        checkpoint = None
    else:
        checkpoint = _checkpoint_file(args.checkpoint)
        cfg = _checkpoint_config(args, extra, checkpoint)
    device = resolve_device(cfg.device)
    tok = tokenizer_for(cfg)
    model = new_model(cfg, tok, seed=0, device=device)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    return cfg, tok, model, device


def cmd_eval(args, extra, reporter) -> int:
    import json

    from recipes.memdlm.data.tasks.prepare import evaluate_model, prepare_data

    cfg, _, model, device = _load_model(args, extra)
    data = prepare_data(cfg)
    result = evaluate_model(model, data, cfg, method=args.method, device=device)
    result = {k: v for k, v in result.items() if not k.startswith("niah")} | {
        "niah_accuracy": result["niah"]["by_length"],
        **(
            {"niah_accuracy_adapted": result["niah_adapted"]["by_length"]}
            if "niah_adapted" in result
            else {}
        ),
    }
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_sample(args, extra, reporter) -> int:
    import torch

    import diffusion as dd
    from recipes.memdlm.method import adapt_to_prompt, make_fast_weights

    cfg, tok, model, device = _load_model(args, extra)
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt is empty")
    if len(ids) + args.gen_length > cfg.model.max_seq_len:
        raise UsageError(
            f"prompt ({len(ids)} tokens) + gen-length {args.gen_length} exceeds the model's "
            f"maximum length {cfg.model.max_seq_len}"
        )
    prompt = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.sample_seed)
    mem = make_fast_weights(model, cfg.memdlm) if args.adapt else None
    try:
        phi = None
        if mem is not None:
            phi = adapt_to_prompt(
                model,
                mem,
                prompt,
                cfg.memdlm,
                mask_id=tok.mask_id,
                generator=generator,
                loss_backend=cfg.loss_backend,
            )
        with torch.no_grad():
            context = mem.bind(phi) if mem is not None else nullcontext()
            with context:
                out = dd.generate(
                    model,
                    prompt,
                    mask_id=tok.mask_id,
                    gen_length=args.gen_length,
                    steps=args.steps or args.gen_length,
                    block_length=args.block_length,
                    remasking=args.remasking,
                    temperature=args.temperature,
                    threshold=args.threshold,
                    generator=generator,
                    **cfg.generate_options(),
                )
    finally:
        if mem is not None:
            mem.remove()
    print(tok.decode(out[0, len(ids) :].tolist()))
    return 0


def cmd_inner_lr(args, extra, reporter) -> int:
    from recipes.memdlm.commands.inner_lr import run_scan

    cfg = _config(args, extra)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
    if not lrs or any(lr < 0 for lr in lrs):
        raise UsageError(f"--lrs needs non-negative numbers, got {args.lrs!r}")
    out = _fresh_folder(args.out or Path("runs") / f"inner-lr-{cfg.preset}-{_stamp()}")
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


def split_overrides(argv: list[str], flags: set[str]) -> tuple[list[str], list[str]]:
    """Take the configuration overrides out of argv: every `--key VALUE` (or `--key=VALUE`) whose
    `--key` is not one of the command's own `flags`.

    argparse would otherwise read the VALUE of an option it does not know as the command's
    positional argument (`eval --data.eval_per_cell 2 run/` would look for a checkpoint '2').
    """
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and token.partition("=")[0] not in flags:
            takes_next = "=" not in token and i + 1 < len(argv)
            overrides += argv[i : i + 1 + takes_next]
            i += 1 + takes_next
        else:
            rest.append(token)
            i += 1
    return rest, overrides


def command_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The option strings of one subcommand (empty for an unknown command)."""
    choices = parser._subparsers._group_actions[0].choices  # argparse keeps no public accessor
    sub = choices.get(command)
    return {o for a in sub._actions for o in a.option_strings} if sub is not None else set()


HANDLERS = {
    "compare": cmd_compare,
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
    "inner-lr": cmd_inner_lr,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["harness"]:  # lm-eval's own CLI with the `memdlm` model (docs/evaluation.md)
        from recipes.memdlm.eval.harness import main as harness_main

        return harness_main(argv[1:])
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare", *argv]
    parser = build_parser()
    flags = command_flags(parser, argv[0])
    overrides: list[str] = []
    if flags:
        rest, overrides = split_overrides(argv[1:], flags)
        argv = [argv[0], *rest]
    args, extra = parser.parse_known_args(argv)
    extra += overrides
    from recipes.memdlm.data.tasks.tasks import DataError
    from recipes.memdlm.loop.phase import Interrupted, TrainingError
    from recipes.memdlm.loop.progress import Reporter

    reporter = Reporter(quiet=getattr(args, "quiet", False))
    try:
        return HANDLERS[args.command](args, extra, reporter)
    except (ConfigError, DataError, UsageError, FileNotFoundError, ValueError, TypeError) as error:
        if os.environ.get("MEMDLM_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    except Interrupted as error:
        print(f"{error}; continue with --resume", file=sys.stderr)
        return 130
