"""Loading what the lm-eval model `memdlm` evaluates: a run of this recipe (its folder or
model.pt, configured by the config.json beside it), or a Hugging Face model (`pretrained=`, a
folder or a hub id) with its own weights or a PEFT LoRA adapter (`peft=`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.config import Config, ModelConfig

log = logging.getLogger("recipes.memdlm.eval.harness_setup")


@dataclass
class LoadedRun:
    """A model ready for evaluation: the denoiser, its tokenizer, the recipe config, device."""

    model: torch.nn.Module
    tokenizer: Any  # data.ByteTokenizer or hf.HFTokenizer
    config: Config
    device: torch.device


def pick_device(name: str | None) -> torch.device:
    """`name` as a torch device; None/"auto" and any CUDA device without CUDA mean the CPU when
    CUDA is unavailable (lm-eval's CLI always asks for cuda:0)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("memdlm: device %s requested but CUDA is unavailable; using the CPU", name)
        return torch.device("cpu")
    return device


def run_config_path(checkpoint: Path) -> Path:
    """The config.json of the run that holds `checkpoint` (its folder or up to two above)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    raise ValueError(
        f"memdlm model arg run={str(checkpoint)!r}: no config.json beside the checkpoint"
    )


def load_run(
    path_or_none: str | Path | None,
    *,
    pretrained: str | Path | None = None,
    peft: str | Path | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    mask_token: str | None = None,
    eos_token: str | None = None,
    device: str | torch.device | None = None,
) -> LoadedRun:
    """A run of this recipe (its folder, or its model.pt; the config from config.json beside
    it) or, with `path_or_none=None`, the Hugging Face model `pretrained` (a folder or a hub id
    in the Hugging Face cache) with its own weights, or with the PEFT LoRA adapter `peft` (a
    folder or hub id), and the paper's inner-loop settings. The model is in eval mode on
    `device`."""
    from recipes.memdlm.build import load_weights, new_model
    from recipes.memdlm.data.prepare import tokenizer_for

    where = pick_device(None if device is None else str(device))
    if path_or_none is not None:
        path = Path(path_or_none)
        checkpoint = path / "model.pt" if path.is_dir() else path
        if not checkpoint.is_file():
            raise ValueError(f"memdlm model arg run={str(path)!r}: no model.pt found")
        cfg = Config.model_validate_json(run_config_path(checkpoint).read_text())
    elif pretrained is not None:
        from recipes.memdlm.backbones import hf

        hf.resolve(str(pretrained), what="memdlm model arg pretrained=")  # UserError: ValueError
        if peft is not None:
            hf.resolve(str(peft), what="memdlm model arg peft=")
        model_cfg = ModelConfig(
            path=str(pretrained),
            adapter=None if peft is None else str(peft),
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            mask_token=mask_token,
            eos_token=eos_token,
        )
        cfg, checkpoint = Config(model=model_cfg), None
    else:
        raise ValueError("load_run needs a run path or pretrained=")
    cfg = cfg.model_copy(update={"device": str(where)})
    tokenizer = tokenizer_for(cfg)
    model = new_model(cfg, tokenizer, seed=0, device=where)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    return LoadedRun(model, tokenizer, cfg, where)
