"""The run's model and tokenizer from its configuration: the reference Transformer over bytes, or
a Hugging Face model (`model.path`, hf.py) with its own tokenizer; checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import diffusion as dd
from recipes.memdlm.backbones import adapter, describe_line
from recipes.memdlm.config import Config
from recipes.memdlm.data.tasks import ByteTokenizer
from recipes.memdlm.loop import checkpoint as ckpt


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def new_model(cfg: Config, tok: ByteTokenizer, *, seed: int, device) -> torch.nn.Module:
    torch.manual_seed(seed)
    if cfg.model.path:
        from recipes.memdlm.backbones import hf

        return hf.load_model(cfg, device=device)
    m = cfg.model
    model = dd.Transformer(
        tok.vocab_size,
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        d_ff=m.d_ff,
        max_seq_len=m.max_seq_len,
    )
    return model.to(device)


def tokenizer_for(cfg: Config):
    """The run's tokenizer: bytes, or the Hugging Face model's own (`model.path`)."""
    if not cfg.model.path:
        return ByteTokenizer()
    from recipes.memdlm.backbones import hf

    m = cfg.model
    return hf.load_tokenizer(
        m.path,
        mask_token=m.mask_token,
        eos_token=m.eos_token,
        trust_remote_code=m.trust_remote_code,
    )


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = ckpt.load(path)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model: {error}") from None


def announce(model, cfg: Config, reporter) -> dict:
    """Say at start what the run trains on (family, forward path, fast-weight modules and where:
    `Backbone.describe`) and return the same facts, JSON-ready, for `summary.json`."""
    info = adapter(model).describe(cfg.memdlm.layer_fraction, tuple(cfg.memdlm.targets))
    reporter.note(describe_line(info))
    return json.loads(json.dumps(info, default=str))
