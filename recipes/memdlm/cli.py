"""Command line of the MemDLM recipe: `python -m recipes.memdlm [command] [options]`.

With no command it runs `compare` on the default preset. Any `--section.key value` option
that is not one of a command's own flags overrides the configuration (see config.py).
User errors print one line and exit with code 2; a stopped training run exits with 1;
Ctrl-C checkpoints and exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from recipes.memdlm.commands.folders import USER_ERRORS
from recipes.memdlm.config import PRESETS

COMMANDS = (
    "train",
    "eval",
    "sample",
    "compare",
    "inner-lr",
    "data",
    "export",
    "estimate",
    "harness",
)
CHECKPOINT_HELP = (
    "model.pt, or a run folder holding one; may be left out with --model PATH_OR_HUB_ID, "
    "which then uses the Hugging Face model's own weights (or --model.adapter's LoRA on them)"
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
        "--model PATH_OR_HUB_ID (short for --model.path) uses a Hugging Face model (a folder, or "
        "a hub id resolved through the Hugging Face cache; HF_HUB_OFFLINE=1 honoured), "
        "--model.adapter PATH_OR_HUB_ID loads a PEFT LoRA adapter onto it.",
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
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the cache, nor use the shipped base: pretrain",
    )
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain the base even if a cached or shipped one fits",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="fine-tuning runs side by side (default: one per CPU core; 1 on a GPU)",
    )
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
    p.add_argument(
        "--sampler",
        choices=("diffusion", "llada21"),
        default="diffusion",
        help="diffusion: diffusion.generate (LLaDA / Fast-dLLM); llada21: the LLaDA2.1 sampler "
        "of the authors' evaluation (diffusion.generate_block_aligned; docs/diffusion.md)",
    )
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument(
        "--steps",
        type=int,
        help="denoising steps (default: gen-length); llada21: steps per block (default: "
        "block length)",
    )
    p.add_argument(
        "--block-length",
        type=int,
        help="semi-autoregressive block length (llada21: blocks from position 0, default 32)",
    )
    p.add_argument(
        "--minimal-topk",
        type=int,
        default=1,
        help="llada21: at most gen-length // minimal-topk steps per block (default 1)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--remasking",
        default="low_confidence",
        choices=("low_confidence", "random", "margin", "entropy"),
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="parallel decoding confidence threshold (llada21: default 0.95)",
    )
    p.add_argument(
        "--cache",
        choices=("none", "prefix", "dual"),
        default="none",
        help="Fast-dLLM's block-wise KV cache (approximate; docs/diffusion.md)",
    )
    p.add_argument(
        "--cache-refresh",
        type=int,
        help="with --cache, also rebuild the cache every N steps inside a block",
    )
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=0.0,
        help="classifier-free guidance scale w (LLaDA: un + (w+1)(cond - un), prompt masked)",
    )
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

    p = sub.add_parser(
        "data",
        allow_abbrev=False,
        help="show the encoded training examples",
        description="Every example of data.train_file (JSONL, JSON, Parquet or a datasets "
        "folder; without one, the embedded training set) in file order, encoded as the model "
        'sees it: one JSON object per line, {"input_ids": [...], "prompt_length": n}, before '
        "padding; the first n ids are the prompt, never scored. On stdout unless --jsonl or "
        "--show is given.",
    )
    _add_config_options(p)
    p.add_argument(
        "--show",
        type=_count,
        default=0,
        metavar="N",
        help="print the first N decoded, special tokens written out, the scored part in "
        "<scored></scored>",
    )
    p.add_argument("--jsonl", type=Path, metavar="OUT", help="write the JSON lines to OUT")

    p = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="write a trained run as a PEFT adapter, a transformers folder or safetensors",
        description="An outer-LoRA run of a Hugging Face model: a PEFT adapter folder "
        "(adapter_config.json, adapter_model.safetensors) for peft.PeftModel.from_pretrained. "
        "With --merged, or for full fine-tuning: a save_pretrained folder (safetensors, config, "
        "tokenizer, the base's remote-code files) for AutoModel*.from_pretrained. The reference "
        "Transformer: model.safetensors and config.json "
        "(recipes.memdlm.backbones.export.load_reference).",
    )
    _add_config_options(p)
    p.add_argument("run", type=Path, help="a run folder holding model.pt, or the model.pt")
    p.add_argument("--out", type=Path, required=True, help="new folder to write")
    p.add_argument(
        "--merged",
        action="store_true",
        help="merge the LoRA weights into the base and write the whole model",
    )

    p = sub.add_parser(
        "estimate",
        allow_abbrev=False,
        help="memory, disk and time of a training run, before it starts",
        description="GPU memory per GPU, checkpoint disk, time per step and for the whole run "
        "(from a stated or measured throughput) of `train` with the same options, and whether "
        "it fits (docs/reproduce.md).",
    )
    _add_config_options(p)
    p.add_argument("--method", choices=("standard", "memdlm"), help="objective (default memdlm)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel processes (default 1)")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU, to say whether it fits")
    p.add_argument("--tokens-per-second", type=float, help="training tokens per second of one GPU")
    p.add_argument(
        "--probe-steps",
        type=int,
        default=0,
        help="measure the throughput: run this many steps here (after one warm-up step)",
    )

    # Listed for --help only: `main` hands `harness` and everything after it to lm-eval's own
    # command line before this parser runs (its options are lm-eval's, not ours).
    sub.add_parser(
        "harness",
        add_help=False,
        help="lm-evaluation-harness with the `memdlm` model (lm-eval's own arguments; needs the "
        "eval extra; docs/evaluation.md)",
    )
    return parser


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


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


# command -> (module under recipes.memdlm.commands, handler); imported on use, so that `--help`
# and argument errors answer without importing torch.
HANDLERS = {
    "compare": ("compare", "cmd_compare"),
    "train": ("train", "cmd_train"),
    "eval": ("evaluate", "cmd_eval"),
    "sample": ("sample", "cmd_sample"),
    "inner-lr": ("inner_lr", "cmd_inner_lr"),
    "data": ("data", "cmd_data"),
    "export": ("export", "cmd_export"),
    "estimate": ("estimate", "cmd_estimate"),
}


def handler(command: str):
    """The function that runs `command` (args, extra, reporter) -> exit code."""
    module, name = HANDLERS[command]
    return getattr(importlib.import_module(f"recipes.memdlm.commands.{module}"), name)


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
    from recipes.memdlm.allocator import keep_freed_memory
    from recipes.memdlm.loop.progress import Reporter
    from recipes.memdlm.loop.steps import Interrupted, TrainingError

    keep_freed_memory()  # CPU steps without the page-fault churn (allocator.py)
    reporter = Reporter(quiet=getattr(args, "quiet", False))
    try:
        return handler(args.command)(args, extra, reporter)
    except USER_ERRORS as error:  # ConfigError, DataError, UsageError, bad files and values
        if os.environ.get("MEMDLM_DEBUG"):
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines) or type(error).__name__}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    except Interrupted as error:
        print(f"{error}; continue with --resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside a training loop (data preparation, evaluation, sampling)
        print("interrupted", file=sys.stderr)
        return 130
