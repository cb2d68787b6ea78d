"""What every command shares: run folders, the configuration from the command line, and loading
a trained model (a checkpoint, or a Hugging Face model as it is)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from recipes.memdlm.config import (
    Config,
    ConfigError,
    build_config,
    deep_merge,
    error_line,
    parse_overrides,
)
from recipes.memdlm.errors import UserError


class UsageError(UserError):
    """A command-line mistake reported in one line with exit code 2."""


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def fresh_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"run folder {str(path)!r} is a file; give --out a new folder's path")
    if path.exists() and any(path.iterdir()):
        raise UsageError(f"run folder {str(path)!r} exists and is not empty; use --resume or --out")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"run folder {str(path)!r} is inside {str(parent)!r}, a file")
    return path


# The errors the CLI reports as the user's (cli.main); on them `removed_on_user_error` cleans
# up. Only those raised deliberately about the user's input: ConfigError, DataError, UsageError
# and the others are UserErrors. Anything else is a bug and keeps its traceback and the folder.
USER_ERRORS = (UserError,)


@contextlib.contextmanager
def removed_on_user_error(path: Path):
    """Run a command that writes the run folder `path`; if a user error (a bad checkpoint, a
    module name that matches nothing...) is found after the command created the folder, and
    before any checkpoint was written into it, remove the folder again, so that a failed command
    leaves nothing behind. A folder that existed before (empty, or resumed) is never removed."""
    created = not path.exists()
    try:
        yield path
    except USER_ERRORS:
        if created and path.is_dir() and not any(path.rglob("*.pt")):
            shutil.rmtree(path, ignore_errors=True)
        raise


def config_from_args(args, extra: list[str], **fixed) -> Config:
    overrides = parse_overrides(extra)
    for key, value in fixed.items():
        if value is not None:
            overrides[key] = value
    return build_config(args.preset, args.config, overrides)


def run_config(args, extra, *, conflicting: tuple[str, ...], **fixed) -> tuple[Config, Path | None]:
    """The run's configuration and folder, for every command that writes a run folder:
    `--resume FOLDER` takes the configuration saved there (and no other option: `conflicting`
    names the command's own), else the command line (`config_from_args`) and `--out` (None:
    the command picks a fresh folder's name)."""
    if args.resume is not None:
        if extra or args.config or any(getattr(args, name, None) for name in conflicting):
            raise UsageError("--resume takes the saved configuration; drop other options")
        return resumed_config(args.resume), args.resume
    return config_from_args(args, extra, **fixed), args.out


def resumed_config(folder: Path) -> Config:
    path = folder / "config.json"
    if not path.is_file():
        raise UsageError(f"cannot resume: {str(path)!r} does not exist")
    try:
        return Config.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as error:  # pydantic's message is several lines; UnicodeDecodeError too
        raise UsageError(
            f"cannot resume: {path} is not a valid config ({error_line(error)}); it is written "
            "by the command that created the run folder"
        ) from None


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
            try:
                base = Config.model_validate_json(saved.read_text(encoding="utf-8")).model_dump()
            except ValueError as error:
                raise ConfigError(
                    f"{saved} (the configuration beside the checkpoint) is not valid "
                    f"({error_line(error)}); "
                    "fix or remove it"
                ) from None
            merged = deep_merge(base, parse_overrides(extra))
            try:
                return Config.model_validate(merged)
            except ValueError as error:
                raise ConfigError(error_line(error)) from None
    return config_from_args(args, extra)


def load_model(args, extra):
    from recipes.memdlm.build import load_weights, new_model, resolve_device
    from recipes.memdlm.data.prepare import tokenizer_for

    if args.checkpoint is None:  # a pretrained Hugging Face model as it is
        cfg = config_from_args(args, extra)
        if not cfg.model.path:
            raise UsageError("give a checkpoint (model.pt or a run folder), or --model PATH")
        checkpoint = None
    else:
        checkpoint = checkpoint_file(args.checkpoint)
        cfg = checkpoint_config(args, extra, checkpoint)
    device = resolve_device(cfg.device, cfg.kernels)
    tok = tokenizer_for(cfg)
    model = new_model(cfg, tok, seed=0, device=device)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    return cfg, tok, model, device
