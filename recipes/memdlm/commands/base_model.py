"""The comparison's base model before fine-tuning: where it comes from, in order of preference.

1. `--base CKPT`: the user's checkpoint.
2. A Hugging Face backbone (`model.path`): its own pretrained weights, no pretraining (as in the
   paper).
3. The cached base of this configuration (runs/cache), else the one that ships with the package
   (`commands.bases`: identity, cache key, the shipped file).
4. Otherwise (or with `--pretrain`): pretrain one with the standard objective.

`compare` and `inner-lr` both start here (`fresh_base` first, so that a bad checkpoint or
fast-weight target fails before a run folder is written, then `obtain_base`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.build import announce, load_weights, new_model
from recipes.memdlm.commands.bases import base_key, differences, shipped_base
from recipes.memdlm.commands.runs import phase_log
from recipes.memdlm.config import Config
from recipes.memdlm.data.prepare import Data, pretrain_sampler
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.phase import phase_options, train_phase


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
    pretrain: bool = False,
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The pretrained base model and its training result (None when given by the user).

    model: the run's freshly built model (`new_model`, seed cfg.seed), with the weights of `base`
    already loaded when `base` is given (see `fresh_base`); built here when None.
    cache: the folder of cached bases, None to neither read nor write it (nor use the shipped
    base). pretrain: pretrain even when a cached or shipped base would do.
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
    if not pretrain and not (folder / "model.pt").exists():
        _reuse_base(cfg, folder, cached, shipped=cache is not None, reporter=reporter)
    log = phase_log(out, folder, cfg.pretrain, "pretrain", "standard", cfg.seed)
    sampler = pretrain_sampler(cfg, data)
    result = train_phase(
        model,
        phase_options(cfg, data, "standard"),
        phase=cfg.pretrain,
        sampler=sampler,
        seed=cfg.seed,
        folder=folder,
        log=log,
        reporter=reporter,
    )
    if cached is not None and (pretrain or not cached.is_file()):  # --pretrain refreshes it
        cached.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(cached, lambda h: h.write((folder / "model.pt").read_bytes()))
    return model, result.__dict__


def _reuse_base(cfg: Config, folder: Path, cached: Path | None, *, shipped: bool, reporter):
    """Copy the cached base, else the shipped one, into `folder`; say why when neither fits."""
    source = cached if cached is not None and cached.is_file() else None
    if source is not None:
        _check_cached(source)
        reporter.note(f"reusing the cached base {cached}")
    elif shipped and (source := shipped_base(cfg)) is not None:
        reporter.note(f"using the base shipped for this configuration ({source.name})")
    elif shipped and (changed := differences(cfg)):
        reporter.note(
            f"no shipped base for this configuration (it differs in {', '.join(changed[:6])}"
            f"{' ...' if len(changed) > 6 else ''}): pretraining one, {cfg.pretrain.steps} steps"
        )
    if source is not None:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / "model.pt")


def _check_cached(path: Path) -> None:
    """A cached base must load before it is copied into a run folder: an unreadable one stops
    the run naming the cache file, with nothing written."""
    try:
        ckpt.load(path)
    except ValueError as error:
        raise UserError(
            f"the cached base {str(path)!r} cannot be used: delete it, or run with --pretrain, "
            f"which replaces it ({error})"
        ) from None


def fresh_base(
    cfg: Config, data: Data, *, base: Path | None, reporter, device
) -> tuple[torch.nn.Module, dict]:
    """The run's model before the run folder is written, so that what only the model can tell
    (a base checkpoint that is corrupt or does not fit, fast-weight targets that match no module)
    fails first: the model (with `base`'s weights when given) and its `announce` record."""
    if base is not None and base.is_dir():
        raise UserError(f"base checkpoint {str(base)!r} is a folder; give its model.pt")
    if base is not None and not base.is_file():
        raise UserError(f"base checkpoint {str(base)!r} does not exist")
    if base is not None:
        ckpt.check(base)  # a corrupt base fails before the backbone line
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=device)
    backbone = announce(model, cfg, reporter)
    if base is not None:
        load_weights(model, base)
    return model, backbone
