"""What every command shares: run folders, the configuration from the command line, and loading
a trained model (a checkpoint, or a Hugging Face model as it is)."""

from __future__ import annotations

import time
from pathlib import Path

from recipes.memdlm.config import Config, ConfigError, build_config, deep_merge, parse_overrides


class UsageError(ValueError):
    """A command-line mistake reported in one line with exit code 2."""


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def fresh_folder(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"run folder {str(path)!r} exists and is not empty; use --resume or --out")
    return path


def config_from_args(args, extra: list[str], **fixed) -> Config:
    overrides = parse_overrides(extra)
    for key, value in fixed.items():
        if value is not None:
            overrides[key] = value
    return build_config(args.preset, args.config, overrides)


def resumed_config(folder: Path) -> Config:
    path = folder / "config.json"
    if not path.is_file():
        raise UsageError(f"cannot resume: {str(path)!r} does not exist")
    try:
        return Config.model_validate_json(path.read_text())
    except ValueError as error:
        raise UsageError(f"cannot resume: {path} is not a valid config ({error})") from None


def checkpoint_file(path: Path) -> Path:
    candidate = path / "model.pt" if path.is_dir() else path
    if not candidate.is_file():
        raise UsageError(f"checkpoint {str(path)!r} not found (expected model.pt)")
    return candidate


def checkpoint_config(args, extra, checkpoint: Path) -> Config:
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
    return config_from_args(args, extra)


def load_model(args, extra):
    from recipes.memdlm.backbones.load import load_weights, new_model, resolve_device, tokenizer_for

    if args.checkpoint is None:  # a pretrained Hugging Face model as it is
        cfg = config_from_args(args, extra)
        if not cfg.model.path:
            raise UsageError("give a checkpoint (model.pt or a run folder), or --model PATH")
        checkpoint = None
    else:
        checkpoint = checkpoint_file(args.checkpoint)
        cfg = checkpoint_config(args, extra, checkpoint)
    device = resolve_device(cfg.device)
    tok = tokenizer_for(cfg)
    model = new_model(cfg, tok, seed=0, device=device)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    return cfg, tok, model, device
